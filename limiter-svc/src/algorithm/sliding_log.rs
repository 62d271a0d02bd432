//! Sliding window log, embedded: see `sliding_log.lua` for the semantics.

use std::collections::VecDeque;

use super::{Params, Peeked, State};

fn live(state: Option<&State>, from: f64) -> impl Iterator<Item = &(f64, f64)> {
    let entries = match state {
        Some(State::Log(entries)) => Some(entries.iter()),
        _ => None,
    };
    entries
        .into_iter()
        .flatten()
        .filter(move |(at, _)| *at > from)
}

pub fn peek(state: Option<&State>, now: f64, p: &Params) -> Peeked {
    let from = now - p.window;
    let count: f64 = live(state, from).map(|(_, n)| n).sum();
    let allowed = count + p.cost <= p.limit;
    let retry = if allowed {
        0.0
    } else {
        // The (count + cost - limit)-th oldest live unit must leave the window.
        let need = count + p.cost - p.limit;
        let mut seen = 0.0;
        live(state, from)
            .find(|(_, n)| {
                seen += n;
                seen >= need
            })
            .map_or(p.window, |(at, _)| at + p.window - now)
    };
    let reset = live(state, from)
        .last()
        .map_or(0.0, |(at, _)| at + p.window - now);
    Peeked {
        allowed,
        limit: p.limit,
        remaining: (p.limit - count).max(0.0),
        reset,
        retry,
    }
}

pub fn commit(state: Option<State>, now: f64, p: &Params) -> (State, f64, f64) {
    let from = now - p.window;
    let mut entries = match state {
        Some(State::Log(entries)) => entries,
        _ => VecDeque::new(),
    };
    while entries.front().is_some_and(|(at, _)| *at <= from) {
        entries.pop_front();
    }
    entries.push_back((now, p.cost));
    (State::Log(entries), p.window, p.window)
}
