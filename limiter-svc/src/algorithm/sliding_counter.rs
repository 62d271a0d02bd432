//! Sliding window counter, embedded: see `sliding_counter.lua` for the semantics.

use super::{Params, Peeked, State};

fn current(state: Option<&State>, now: f64, p: &Params) -> (f64, f64, f64) {
    let idx = (now / p.window).floor();
    match state {
        Some(State::Counter { w, cur, prev }) if *w == idx => (idx, *cur, *prev),
        Some(State::Counter { w, cur, .. }) if *w == idx - 1.0 => (idx, 0.0, *cur),
        _ => (idx, 0.0, 0.0),
    }
}

pub fn peek(state: Option<&State>, now: f64, p: &Params) -> Peeked {
    let (idx, cur, prev) = current(state, now, p);
    let start = idx * p.window;
    let elapsed = now - start;
    let estimate = prev * (p.window - elapsed) / p.window + cur;
    let allowed = estimate + p.cost <= p.limit;
    let retry = if allowed {
        0.0
    } else if cur + p.cost <= p.limit {
        let e = p.window * (1.0 - (p.limit - cur - p.cost) / prev);
        (start + e - now).ceil()
    } else {
        let e = if cur > 0.0 {
            (p.window * (1.0 - (p.limit - p.cost) / cur)).max(0.0)
        } else {
            0.0
        };
        (start + p.window + e - now).ceil()
    };
    let reset = if cur > 0.0 {
        start + 2.0 * p.window - now
    } else if prev > 0.0 {
        start + p.window - now
    } else {
        0.0
    };
    Peeked {
        allowed,
        limit: p.limit,
        remaining: (p.limit - estimate).floor().max(0.0),
        reset,
        retry,
    }
}

pub fn commit(state: Option<State>, now: f64, p: &Params) -> (State, f64, f64) {
    let (idx, cur, prev) = current(state.as_ref(), now, p);
    let reset = idx * p.window + 2.0 * p.window - now;
    (
        State::Counter {
            w: idx,
            cur: cur + p.cost,
            prev,
        },
        reset,
        2.0 * p.window,
    )
}
