#!/usr/bin/env python3
"""Black-box test of limiter-svc's Envoy rate limit service, from a client that shares no
code with the server: Envoy's own protos as published on PyPI (`xds-protos`) over `grpcio`.

    python tests/python/test_rls.py 127.0.0.1:50051 RUN_ID [API_KEY]

The server must run with tests/python/rls_limits.toml as its limits file:

    per-ip:  3 per minute              rule ["remote_address"]           (a counter per value)
    edge.1:  2 per hour (inline)       rule ["path=/api/*", "user"]      (prefix match)
    edge.2:  5 per hour, token bucket  rule ["tier=gold"]                (exact match)

With API_KEY (a server with auth on), every call sends it as `authorization: Bearer` metadata,
as Envoy does with the rate limit cluster's `initial_metadata`, and one more group checks that
calls without it, or with a wrong key, are UNAUTHENTICATED.

RUN_ID goes into every descriptor value that a counter is keyed on, so a rerun against the same
server (or the same Redis) never shares counters with an earlier run. Each check group prints
PASS or FAIL with the reason; the last line is "N passed, N failed"; the exit code is 0 only
when every group passed (1 on a failure, 2 on bad usage or an unreachable server).
"""

import hashlib
import re
import sys
import traceback

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2

DOMAIN = "edge"
OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
UNIT = rls_pb2.RateLimitResponse.RateLimit
CODE_NAME = rls_pb2.RateLimitResponse.Code.Name
RPC_TIMEOUT = 5.0


class Client:
    def __init__(self, address, run_id, api_key=None):
        self.channel = grpc.insecure_channel(address)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.stub = rls_pb2_grpc.RateLimitServiceStub(self.channel)
        self.run_id = run_id
        # Two octets from the run id, so IP values differ between runs; the last octet tells
        # the check groups apart. Each group also asserts its first answer shows a fresh counter.
        digest = hashlib.sha256(run_id.encode()).digest()
        self.ip_prefix = f"10.{digest[0]}.{digest[1]}"

    def ip(self, n):
        return f"{self.ip_prefix}.{n}"

    def call(self, descriptors, hits_addend=0, domain=DOMAIN):
        request = rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits_addend)
        return self.stub.ShouldRateLimit(request, timeout=RPC_TIMEOUT, metadata=self.metadata)


def descriptor(*entries, hits_addend=None):
    d = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if hits_addend is not None:
        d.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits_addend))
    return d


def show(response):
    """One-line rendering of a response for failure messages."""
    statuses = []
    for s in response.statuses:
        text = CODE_NAME(s.code)
        if s.HasField("current_limit"):
            cl = s.current_limit
            text += f"(limit {cl.name!r} {cl.requests_per_unit}/{UNIT.Unit.Name(cl.unit)}, remaining {s.limit_remaining}"
            text += f", reset {s.duration_until_reset.seconds}.{s.duration_until_reset.nanos:09d}s)"
        statuses.append(text)
    headers = [f"{h.key}: {h.value}" for h in response.response_headers_to_add]
    return f"overall={CODE_NAME(response.overall_code)} statuses=[{', '.join(statuses)}] headers={headers}"


def expect(cond, what, response=None):
    if not cond:
        raise AssertionError(what + (f"\n      response: {show(response)}" if response is not None else ""))


def reset_secs(status):
    return status.duration_until_reset.seconds + status.duration_until_reset.nanos / 1e9


def headers_of(response):
    """Header name (lower case) → value; each name must appear once."""
    out = {}
    for h in response.response_headers_to_add:
        key = h.key.lower()
        expect(key not in out, f"header {h.key} appears twice", response)
        out[key] = h.value
    return out


POLICY_RE = re.compile(r'^"([^"]+)";q=(\d+);w=(\d+)$')
RATELIMIT_RE = re.compile(r'^"([^"]+)";r=(\d+);t=(\d+)$')


def parse_headers(response):
    """(name, q, w), (name, r, t), retry_after or None, from the response's headers."""
    h = headers_of(response)
    expect("ratelimit-policy" in h, "no RateLimit-Policy header", response)
    expect("ratelimit" in h, "no RateLimit header", response)
    m = POLICY_RE.match(h["ratelimit-policy"])
    expect(m is not None, f'RateLimit-Policy {h["ratelimit-policy"]!r} is not "<name>";q=<n>;w=<n>', response)
    policy = (m.group(1), int(m.group(2)), int(m.group(3)))
    m = RATELIMIT_RE.match(h["ratelimit"])
    expect(m is not None, f'RateLimit {h["ratelimit"]!r} is not "<name>";r=<n>;t=<n>', response)
    limit = (m.group(1), int(m.group(2)), int(m.group(3)))
    expect(policy[0] == limit[0], f"RateLimit-Policy names {policy[0]!r} but RateLimit names {limit[0]!r}", response)
    retry = h.get("retry-after")
    if retry is not None:
        expect(re.fullmatch(r"\d+", retry) is not None, f"Retry-After {retry!r} is not an integer", response)
        retry = int(retry)
    return policy, limit, retry


def expect_fresh(response, index, what):
    """The first hit on a counter this run made: anything else means the run id was reused."""
    s = response.statuses[index]
    expect(
        s.code == OK and s.limit_remaining == s.current_limit.requests_per_unit - 1,
        f"{what}: first hit should leave {s.current_limit.requests_per_unit - 1} "
        f"(a fresh counter); is the run id reused within the window?",
        response,
    )


def expect_no_match(response, index, what):
    s = response.statuses[index]
    expect(s.code == OK, f"{what}: matches no rule, so its code should be OK", response)
    expect(not s.HasField("current_limit"), f"{what}: matches no rule, so it should have no current_limit", response)


# ---------------------------------------------------------------------------------------------


def check_exact_value_counters(c):
    ip = c.ip(1)
    d = [descriptor(("remote_address", ip))]
    for i in range(1, 4):
        r = c.call(d)
        expect(r.overall_code == OK, f"hit {i} of 3 on remote_address={ip} should be OK", r)
        expect(len(r.statuses) == 1, "one status per descriptor", r)
        s = r.statuses[0]
        expect(s.code == OK, f"hit {i}: descriptor code should be OK", r)
        expect(s.HasField("current_limit"), f"hit {i}: a matched descriptor carries current_limit", r)
        expect(s.limit_remaining == 3 - i, f"hit {i}: limit_remaining should be {3 - i}", r)
    r = c.call(d)
    expect(r.overall_code == OVER_LIMIT, "hit 4 of a 3/min limit should be OVER_LIMIT overall", r)
    s = r.statuses[0]
    expect(s.code == OVER_LIMIT, "hit 4: descriptor code should be OVER_LIMIT", r)
    expect(s.HasField("current_limit"), "hit 4: current_limit should be set", r)
    expect(s.current_limit.requests_per_unit == 3, "current_limit.requests_per_unit should be 3", r)
    expect(s.current_limit.unit == UNIT.MINUTE, "current_limit.unit should be MINUTE", r)
    expect(s.current_limit.name == "per-ip", "current_limit.name should be the policy name per-ip", r)
    expect(s.limit_remaining == 0, "hit 4: limit_remaining should be 0", r)
    expect(0 < reset_secs(s) <= 60, "hit 4: duration_until_reset should be in (0, 60s]", r)

    other = c.ip(2)
    r = c.call([descriptor(("remote_address", other))])
    expect(r.overall_code == OK, f"remote_address={other} has its own counter and should be OK", r)
    expect_fresh(r, 0, f"remote_address={other}")


def check_prefix_match(c):
    d = [descriptor(("path", f"/api/{c.run_id}/x"), ("user", f"u-{c.run_id}"))]
    for i in range(1, 3):
        r = c.call(d)
        expect(r.overall_code == OK, f"hit {i} of 2 on path=/api/{c.run_id}/x should be OK", r)
        s = r.statuses[0]
        expect(s.HasField("current_limit"), "a path under /api/ matches path=/api/* and carries current_limit", r)
        expect(s.current_limit.requests_per_unit == 2, "inline rule limit should be 2", r)
        expect(s.current_limit.unit == UNIT.HOUR, "inline rule unit should be HOUR", r)
        expect(s.limit_remaining == 2 - i, f"hit {i}: limit_remaining should be {2 - i}", r)
    r = c.call(d)
    expect(r.overall_code == OVER_LIMIT, "hit 3 of a 2/h limit should be OVER_LIMIT", r)
    expect(r.statuses[0].code == OVER_LIMIT, "hit 3: descriptor code should be OVER_LIMIT", r)
    expect(r.statuses[0].limit_remaining == 0, "hit 3: limit_remaining should be 0", r)
    expect(0 < reset_secs(r.statuses[0]) <= 3600, "hit 3: duration_until_reset should be in (0, 1h]", r)

    # Another value of the free `user` entry under the same prefix: its own counter.
    r = c.call([descriptor(("path", f"/api/{c.run_id}/x"), ("user", f"v-{c.run_id}"))])
    expect(r.overall_code == OK, "another user value has its own counter", r)
    expect_fresh(r, 0, "user=v-…")

    for entries, what in [
        ((("path", "/web/x"), ("user", f"u-{c.run_id}")), "path=/web/x (outside /api/)"),
        ((("path", "/api"), ("user", f"u-{c.run_id}")), "path=/api (prefix is /api/)"),
        ((("user", f"u-{c.run_id}"), ("path", f"/api/{c.run_id}/x")), "entries in the wrong order"),
        ((("path", f"/api/{c.run_id}/x"),), "path alone (the rule has two entries)"),
        ((("remote_address", c.ip(1)), ("extra", "x")), "remote_address plus an extra entry"),
    ]:
        r = c.call([descriptor(*entries)])
        expect(r.overall_code == OK, f"{what}: matches no rule, so overall should be OK", r)
        expect_no_match(r, 0, what)
        expect(len(r.response_headers_to_add) == 0, f"{what}: no rule matched, so no rate limit headers", r)

    r = c.call([descriptor(("remote_address", c.ip(1)))], domain=f"unknown-{c.run_id}")
    expect(r.overall_code == OK, "a domain with no rules answers OK", r)
    expect_no_match(r, 0, "unknown domain")


def check_exact_match_rule(c):
    # tier=gold is keyed on a fixed value, so every run shares its counter: check the rule
    # matched (its limit), not the code.
    r = c.call([descriptor(("tier", "gold"))])
    s = r.statuses[0]
    expect(s.HasField("current_limit"), "tier=gold matches the exact rule", r)
    expect(s.current_limit.requests_per_unit == 5, "tier=gold limit should be 5", r)
    expect(s.current_limit.unit == UNIT.HOUR, "tier=gold unit should be HOUR", r)
    expect(s.limit_remaining <= 5, "tier=gold limit_remaining at most 5", r)
    for value in ["silver", "gold2", "Gold", ""]:
        r = c.call([descriptor(("tier", value))])
        expect(r.overall_code == OK, f"tier={value!r} matches no rule: overall OK", r)
        expect_no_match(r, 0, f"tier={value!r}")


def check_hits_addend(c):
    ip = c.ip(3)
    d = [descriptor(("remote_address", ip))]
    r = c.call(d, hits_addend=2)
    expect(r.overall_code == OK, "hits_addend=2 on a fresh 3/min counter should be OK", r)
    expect(r.statuses[0].limit_remaining == 1, "after hits_addend=2 of 3, limit_remaining should be 1 "
           "(if it is lower the run id was reused)", r)
    r = c.call(d, hits_addend=2)
    expect(r.overall_code == OVER_LIMIT, "hits_addend=2 with 1 left should be OVER_LIMIT", r)
    expect(r.statuses[0].code == OVER_LIMIT, "descriptor code should be OVER_LIMIT", r)
    r = c.call(d, hits_addend=1)
    expect(r.overall_code == OK, "hits_addend=1 with 1 left should be OK: the denied 2 took nothing", r)
    expect(r.statuses[0].limit_remaining == 0, "after 2+1 of 3, limit_remaining should be 0", r)
    r = c.call(d, hits_addend=1)
    expect(r.overall_code == OVER_LIMIT, "the counter is now full", r)

    # hits_addend=0 (the proto3 default) counts as 1.
    r = c.call([descriptor(("remote_address", c.ip(4)))], hits_addend=0)
    expect(r.statuses[0].limit_remaining == 2, "hits_addend=0 should count as 1", r)

    # Descriptor-level hits_addend replaces the request's, in both directions.
    r = c.call([descriptor(("remote_address", c.ip(5)), hits_addend=3)], hits_addend=1)
    expect(r.overall_code == OK, "descriptor hits_addend=3 on a fresh 3/min counter should be OK", r)
    expect(r.statuses[0].limit_remaining == 0, "descriptor hits_addend=3 (request 1) should take 3", r)
    r = c.call([descriptor(("remote_address", c.ip(6)), hits_addend=1)], hits_addend=3)
    expect(r.overall_code == OK, "descriptor hits_addend=1 should be OK", r)
    expect(r.statuses[0].limit_remaining == 2, "descriptor hits_addend=1 (request 3) should take 1", r)
    # ... and only for its own descriptor.
    r = c.call(
        [descriptor(("remote_address", c.ip(7)), hits_addend=1), descriptor(("remote_address", c.ip(8)))],
        hits_addend=2,
    )
    expect(r.overall_code == OK, "two fresh counters, costs 1 and 2, should be OK", r)
    expect(r.statuses[0].limit_remaining == 2, "descriptor 0 (own hits_addend=1) should take 1", r)
    expect(r.statuses[1].limit_remaining == 1, "descriptor 1 (request hits_addend=2) should take 2", r)

    # More hits than the limit holds can never pass: OVER_LIMIT (not an error, which Envoy
    # would let through), and the other descriptor of the request is not charged.
    r = c.call([descriptor(("remote_address", c.ip(201)), hits_addend=4), descriptor(("remote_address", c.ip(202)))])
    expect(r.overall_code == OVER_LIMIT, "hits_addend=4 on a 3/min rule should be OVER_LIMIT", r)
    expect(r.statuses[0].code == OVER_LIMIT, "the 4-hit descriptor is the one over the limit", r)
    expect(r.statuses[1].code == OK, "the other descriptor did not deny", r)
    r = c.call([descriptor(("remote_address", c.ip(202)))], hits_addend=3)
    expect(r.overall_code == OK, "the other descriptor was not charged: 3 hits still fit", r)


def check_multi_descriptor_all_or_nothing(c):
    full, fresh = c.ip(9), c.ip(10)
    for i in range(3):
        r = c.call([descriptor(("remote_address", full))])
        expect(r.overall_code == OK, f"filling remote_address={full}: hit {i + 1} should be OK", r)
    # Twice: the first denial comes from the store, the second may come from a cache of
    # recent denials; neither may charge the under-limit descriptor.
    for attempt in (1, 2):
        r = c.call([
            descriptor(("remote_address", fresh)),
            descriptor(("remote_address", full)),
            descriptor(("path", "/web/x"), ("user", "u")),
        ])
        what = f"combined request {attempt}"
        expect(r.overall_code == OVER_LIMIT, f"{what}: one descriptor over limit makes the request OVER_LIMIT", r)
        expect(len(r.statuses) == 3, f"{what}: one status per descriptor, in order", r)
        s0, s1 = r.statuses[0], r.statuses[1]
        expect(s0.code == OK and s0.HasField("current_limit") and s0.current_limit.requests_per_unit == 3,
               f"{what}: statuses[0] (under-limit remote_address) should be OK with its limit", r)
        expect(s1.code == OVER_LIMIT and s1.current_limit.requests_per_unit == 3 and s1.limit_remaining == 0,
               f"{what}: statuses[1] (full remote_address) should be OVER_LIMIT with 0 remaining", r)
        expect_no_match(r, 2, f"{what}: statuses[2] (/web/x)")
    r = c.call([descriptor(("remote_address", fresh))])
    expect(r.overall_code == OK, "the under-limit descriptor alone should be OK", r)
    expect(r.statuses[0].limit_remaining == 2,
           "the under-limit descriptor was charged by the denied requests: its first own hit should leave 2", r)


def check_headers(c):
    # One descriptor.
    r = c.call([descriptor(("remote_address", c.ip(11)))])
    expect_fresh(r, 0, "remote_address for headers")
    (pname, q, w), (lname, rem, t), retry = parse_headers(r)
    expect(pname == "per-ip", f"RateLimit-Policy should name per-ip, names {pname!r}", r)
    expect((q, w) == (3, 60), f"RateLimit-Policy should be q=3;w=60, is q={q};w={w}", r)
    expect(rem == 2, f"RateLimit r should be 2, is {rem}", r)
    expect(1 <= t <= 60, f"RateLimit t should be in 1..60, is {t}", r)
    expect(retry is None, "no Retry-After while OK", r)

    # Most restrictive of two, in both orders: the path rule (2/h, 1 left) beats per-ip (3/min, 2 left).
    for n, order in [(12, "ip first"), (13, "path first")]:
        ip_d = descriptor(("remote_address", c.ip(n)))
        path_d = descriptor(("path", f"/api/{c.run_id}/h{n}"), ("user", f"u-{c.run_id}"))
        ds = [ip_d, path_d] if order == "ip first" else [path_d, ip_d]
        r = c.call(ds)
        expect(r.overall_code == OK, f"{order}: two fresh counters should be OK", r)
        path_status = r.statuses[1] if order == "ip first" else r.statuses[0]
        expect(path_status.limit_remaining == 1, f"{order}: path counter should be fresh (1 left)", r)
        (pname, q, w), (lname, rem, t), retry = parse_headers(r)
        expect(pname == path_status.current_limit.name,
               f"{order}: headers should speak for the most restrictive descriptor "
               f"{path_status.current_limit.name!r} (1 left), not {pname!r}", r)
        expect((q, w) == (2, 3600), f"{order}: RateLimit-Policy should be q=2;w=3600, is q={q};w={w}", r)
        expect(rem == 1, f"{order}: RateLimit r should be 1, is {rem}", r)
        expect(1 <= t <= 3600, f"{order}: RateLimit t should be in 1..3600, is {t}", r)
        expect(retry is None, f"{order}: no Retry-After while OK", r)

    # Over limit: Retry-After.
    d = [descriptor(("remote_address", c.ip(14)))]
    for _ in range(3):
        c.call(d)
    r = c.call(d)
    expect(r.overall_code == OVER_LIMIT, "4th hit should be OVER_LIMIT", r)
    (pname, q, w), (lname, rem, t), retry = parse_headers(r)
    expect((pname, q, w) == ("per-ip", 3, 60), "RateLimit-Policy should be \"per-ip\";q=3;w=60", r)
    expect(rem == 0, f"RateLimit r should be 0 when over limit, is {rem}", r)
    expect(1 <= t <= 60, f"RateLimit t should be in 1..60, is {t}", r)
    expect(retry is not None, "OVER_LIMIT should carry Retry-After", r)
    expect(1 <= retry <= 60, f"Retry-After should be in 1..60 seconds, is {retry}", r)


def expect_invalid(c, request_kwargs, needle, what):
    request = rls_pb2.RateLimitRequest(**request_kwargs)
    try:
        r = c.stub.ShouldRateLimit(request, timeout=RPC_TIMEOUT, metadata=c.metadata)
    except grpc.RpcError as e:
        expect(e.code() == grpc.StatusCode.INVALID_ARGUMENT,
               f"{what}: expected INVALID_ARGUMENT, got {e.code()} ({e.details()!r})")
        expect(needle in (e.details() or ""), f"{what}: details {e.details()!r} should mention {needle!r}")
        return
    expect(False, f"{what}: expected INVALID_ARGUMENT, got a response", r)


def check_bad_input(c):
    d = descriptor(("remote_address", c.ip(15)))
    expect_invalid(c, {"domain": "", "descriptors": [d]}, "domain", "empty domain")
    expect_invalid(c, {"domain": DOMAIN, "descriptors": []}, "descriptors", "no descriptors")
    expect_invalid(c, {"domain": DOMAIN, "descriptors": [ratelimit_pb2.RateLimitDescriptor()]},
                   "entries", "a descriptor with no entries")


def check_credentials(c):
    request = rls_pb2.RateLimitRequest(domain=DOMAIN, descriptors=[descriptor(("remote_address", c.ip(16)))])
    for metadata, what in [((), "no credentials"), ((("authorization", "Bearer sk_wrong"),), "a wrong key")]:
        try:
            r = c.stub.ShouldRateLimit(request, timeout=RPC_TIMEOUT, metadata=metadata)
        except grpc.RpcError as e:
            expect(e.code() == grpc.StatusCode.UNAUTHENTICATED,
                   f"{what}: expected UNAUTHENTICATED, got {e.code()} ({e.details()!r})")
            continue
        expect(False, f"{what}: expected UNAUTHENTICATED, got a response", r)


CHECKS = [
    ("exact value, a counter per value", check_exact_value_counters),
    ("prefix match and non-matching descriptors", check_prefix_match),
    ("exact-match rule tier=gold", check_exact_match_rule),
    ("hits_addend, request and descriptor level", check_hits_addend),
    ("several descriptors: all or nothing", check_multi_descriptor_all_or_nothing),
    ("RateLimit-Policy, RateLimit, Retry-After headers", check_headers),
    ("bad input is INVALID_ARGUMENT", check_bad_input),
]


def main(argv):
    if len(argv) not in (3, 4) or not argv[2]:
        print(f"usage: {argv[0]} HOST:PORT RUN_ID [API_KEY]", file=sys.stderr)
        return 2
    c = Client(argv[1], argv[2], argv[3] if len(argv) == 4 else None)
    checks = CHECKS + ([("without the key: UNAUTHENTICATED", check_credentials)] if c.metadata else [])
    try:
        grpc.channel_ready_future(c.channel).result(timeout=10)
    except grpc.FutureTimeoutError:
        print(f"FAIL: cannot connect to {argv[1]} within 10s", file=sys.stderr)
        return 2
    passed = failed = 0
    for name, check in checks:
        try:
            check(c)
        except AssertionError as e:
            failed += 1
            print(f"FAIL {name}\n    {e}")
        except grpc.RpcError as e:
            failed += 1
            print(f"FAIL {name}\n    unexpected gRPC error {e.code()}: {e.details()}")
        except Exception:  # a bug in this script: say where
            failed += 1
            print(f"FAIL {name}\n    {traceback.format_exc()}")
        else:
            passed += 1
            print(f"PASS {name}")
    print(f"{passed} passed, {failed} failed")
    c.channel.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
