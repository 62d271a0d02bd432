//! Fixed window, embedded: see `fixed_window.lua` for the semantics.

use super::{Params, Peeked, State};

fn count(state: Option<&State>, idx: f64) -> f64 {
    match state {
        Some(State::Fixed { w, n }) if *w == idx => *n,
        _ => 0.0,
    }
}

pub fn peek(state: Option<&State>, now: f64, p: &Params) -> Peeked {
    let idx = (now / p.window).floor();
    let n = count(state, idx);
    let ends = (idx + 1.0) * p.window - now;
    let allowed = n + p.cost <= p.limit;
    Peeked {
        allowed,
        limit: p.limit,
        remaining: (p.limit - n).max(0.0),
        reset: if n > 0.0 { ends } else { 0.0 },
        retry: if allowed { 0.0 } else { ends },
    }
}

pub fn commit(state: Option<State>, now: f64, p: &Params) -> (State, f64, f64) {
    let idx = (now / p.window).floor();
    let n = count(state.as_ref(), idx);
    let ends = (idx + 1.0) * p.window - now;
    (
        State::Fixed {
            w: idx,
            n: n + p.cost,
        },
        ends,
        ends,
    )
}
