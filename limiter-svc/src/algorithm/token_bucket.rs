//! Token bucket, embedded: see `token_bucket.lua` for the semantics.

use super::{Params, Peeked, State};

fn capacity(p: &Params) -> f64 {
    if p.burst > 0.0 { p.burst } else { p.limit }
}

fn tokens(state: Option<&State>, now: f64, p: &Params) -> f64 {
    let cap = capacity(p);
    match state {
        Some(State::Bucket { tokens, ts }) => {
            cap.min(tokens + (now - ts).max(0.0) * (p.limit / p.window))
        }
        _ => cap,
    }
}

pub fn peek(state: Option<&State>, now: f64, p: &Params) -> Peeked {
    let cap = capacity(p);
    let rate = p.limit / p.window;
    let tokens = tokens(state, now, p);
    let allowed = tokens + 1e-9 >= p.cost;
    Peeked {
        allowed,
        limit: cap,
        remaining: (tokens + 1e-9).floor(),
        reset: if tokens < cap {
            ((cap - tokens) / rate).ceil()
        } else {
            0.0
        },
        retry: if allowed {
            0.0
        } else {
            ((p.cost - tokens) / rate).ceil()
        },
    }
}

pub fn commit(state: Option<State>, now: f64, p: &Params) -> (State, f64, f64) {
    let cap = capacity(p);
    let rate = p.limit / p.window;
    let left = tokens(state.as_ref(), now, p) - p.cost;
    let reset = ((cap - left) / rate).ceil();
    (
        State::Bucket {
            tokens: left,
            ts: now,
        },
        reset,
        reset + 1000.0,
    )
}
