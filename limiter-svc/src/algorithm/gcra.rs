//! GCRA, embedded: see `gcra.lua` for the semantics.

use super::{Params, Peeked, State};

fn burst(p: &Params) -> f64 {
    if p.burst > 0.0 { p.burst } else { p.limit }
}

fn tat(state: Option<&State>, now: f64) -> f64 {
    match state {
        Some(State::Gcra { tat }) => tat.max(now),
        _ => now,
    }
}

pub fn peek(state: Option<&State>, now: f64, p: &Params) -> Peeked {
    let burst = burst(p);
    let t = p.window / p.limit;
    let tat = tat(state, now);
    let allow_at = tat + p.cost * t - burst * t;
    let allowed = allow_at <= now + 1e-6;
    Peeked {
        allowed,
        limit: burst,
        remaining: ((now - (tat - burst * t)) / t + 1e-9)
            .floor()
            .clamp(0.0, burst),
        reset: (tat - now).ceil(),
        retry: if allowed {
            0.0
        } else {
            (allow_at - now).ceil()
        },
    }
}

pub fn commit(state: Option<State>, now: f64, p: &Params) -> (State, f64, f64) {
    let t = p.window / p.limit;
    let new_tat = tat(state.as_ref(), now) + p.cost * t;
    let reset = (new_tat - now).ceil();
    (State::Gcra { tat: new_tat }, reset, reset + 1000.0)
}
