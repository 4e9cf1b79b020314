//! The units of a streamed answer that enforce mode holds back until decisions have seen past
//! them.
//!
//! A plain `text/event-stream` body is cut into whole events by capture's [`SseSplitter`], so
//! each unit is one event byte for byte and can be rewritten in place; any other body is held
//! in the upstream's chunks. Every unit is also read by the capture parser, which gives the
//! text so far of each choice: what decisions judge, and what masks are measured against. The
//! decisions themselves (when to judge, what to release) live in [`super::stream`].

use std::collections::VecDeque;

use bytes::Bytes;

use super::rewrite::{Added, masked_piece, merge, rewrite_event};
use crate::capture::{ResponseParser, Route, SseSplitter};

/// One held unit of the body.
#[derive(Debug)]
struct Unit {
    raw: Bytes,
    /// Text length so far (all choices) once this unit had arrived.
    end: usize,
    /// The text this unit added, per choice.
    added: Vec<Added>,
    /// What is sent instead of `raw`, once masks changed it.
    masked: Option<Bytes>,
}

impl Unit {
    fn into_bytes(self) -> Bytes {
        self.masked.unwrap_or(self.raw)
    }
}

/// Per choice: text length so far, text already released, masked spans (merged).
#[derive(Debug, Default)]
struct ChoiceState {
    index: u32,
    len: usize,
    released: usize,
    masks: Vec<(usize, usize)>,
}

/// The units held back from the client, and the text they carry; see the module docs.
#[derive(Debug)]
pub struct Held {
    parser: ResponseParser,
    /// Set when units are whole SSE events that can be rewritten.
    splitter: Option<SseSplitter>,
    units: VecDeque<Unit>,
    choices: Vec<ChoiceState>,
    /// Text length so far, all choices.
    total: usize,
    /// Masks have rewritten held events.
    masked: bool,
}

impl Held {
    /// Holds a body read by `parser`; cut into events when `maskable`, else kept in chunks.
    pub fn new(parser: ResponseParser, maskable: bool) -> Held {
        Held {
            parser,
            splitter: maskable.then(SseSplitter::default),
            units: VecDeque::new(),
            choices: Vec::new(),
            total: 0,
            masked: false,
        }
    }

    /// Takes in a chunk of the upstream body.
    pub fn push(&mut self, chunk: Bytes) {
        match self.splitter.as_mut() {
            Some(splitter) => {
                let mut events = Vec::new();
                splitter.push(&chunk, &mut events);
                for event in events {
                    self.add_unit(event);
                }
            }
            None => self.add_unit(chunk),
        }
    }

    /// Holds a chunk as it is, unread (one past the body limit).
    pub fn push_unread(&mut self, chunk: Bytes) {
        self.units.push_back(Unit {
            raw: chunk,
            end: self.total,
            added: Vec::new(),
            masked: None,
        });
    }

    /// The upstream ended: what was left of a partial event becomes the last unit.
    pub fn upstream_ended(&mut self) {
        if let Some(rest) = self.splitter.as_mut().and_then(SseSplitter::finish) {
            self.add_unit(rest);
        }
    }

    /// Text length so far, all choices.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Whether masks have rewritten held events.
    pub fn masked(&self) -> bool {
        self.masked
    }

    /// The text of each choice so far, by index.
    pub fn texts(&self) -> impl Iterator<Item = (u32, &str)> {
        self.parser.texts_so_far()
    }

    fn add_unit(&mut self, raw: Bytes) {
        self.parser.push(&raw);
        let lengths: Vec<(u32, usize)> = self
            .parser
            .texts_so_far()
            .map(|(index, text)| (index, text.len()))
            .collect();
        let mut added = Vec::new();
        let mut total = 0usize;
        for (index, len) in lengths {
            total = total.saturating_add(len);
            let state = self.choice(index);
            if len > state.len {
                added.push((index, state.len, len));
                state.len = len;
            }
        }
        self.total = total;
        self.units.push_back(Unit {
            raw,
            end: total,
            added,
            masked: None,
        });
    }

    fn choice(&mut self, index: u32) -> &mut ChoiceState {
        let at = match self.choices.iter().position(|c| c.index == index) {
            Some(at) => at,
            None => {
                self.choices.push(ChoiceState {
                    index,
                    ..ChoiceState::default()
                });
                self.choices.len().saturating_sub(1)
            }
        };
        &mut self.choices[at]
    }

    /// Applies masks to the held events, `with` standing for each span; `None` when one cannot
    /// be applied (the stream is blocked instead).
    pub fn mask(
        &mut self,
        route: Route,
        masks: Vec<(u32, Vec<(usize, usize)>)>,
        with: &str,
    ) -> Option<()> {
        if self.splitter.is_none()
            || !matches!(
                route,
                Route::ChatCompletions | Route::Completions | Route::AnthropicMessages
            )
        {
            return None;
        }
        for (index, spans) in masks {
            let state = self.choice(index);
            for (start, end) in spans {
                // Text already sent can only be covered by a span masked before.
                let sent = end.min(state.released);
                let covered =
                    start >= sent || state.masks.iter().any(|&(s, e)| s <= start && e >= sent);
                if !covered {
                    return None;
                }
                state.masks.push((start, end));
            }
            state.masks = merge(std::mem::take(&mut state.masks));
        }
        self.masked = true;
        let texts: Vec<(u32, &str)> = self.parser.texts_so_far().collect();
        let choices = &self.choices;
        for unit in &mut self.units {
            let touched = unit.added.iter().any(|&(index, start, end)| {
                choices
                    .iter()
                    .any(|c| c.index == index && c.masks.iter().any(|&(s, e)| s < end && e > start))
            });
            if !touched {
                continue;
            }
            let render = |index: u32, start: usize, end: usize, original: &str| {
                let text = texts.iter().find(|(i, _)| *i == index)?.1;
                if text.get(start..end)? != original {
                    return None;
                }
                let masks = &choices.iter().find(|c| c.index == index)?.masks;
                masked_piece(text, start, end, masks, with)
            };
            unit.masked = Some(rewrite_event(route, &unit.raw, &unit.added, &render)?);
        }
        Some(())
    }

    /// Moves to `out` the units that `hold` bytes of text judged after them have passed:
    /// those that ended at least `hold` before `judged`.
    pub fn release_judged(&mut self, judged: usize, hold: usize, out: &mut VecDeque<Bytes>) {
        while let Some(unit) = self.units.front() {
            if unit.end.saturating_add(hold) > judged {
                break;
            }
            self.release_front(out);
        }
    }

    /// Moves every held unit to `out`.
    pub fn release_all(&mut self, out: &mut VecDeque<Bytes>) {
        while !self.units.is_empty() {
            self.release_front(out);
        }
    }

    fn release_front(&mut self, out: &mut VecDeque<Bytes>) {
        let Some(unit) = self.units.pop_front() else {
            return;
        };
        for &(index, _, end) in &unit.added {
            let state = self.choice(index);
            state.released = state.released.max(end);
        }
        out.push_back(unit.into_bytes());
    }
}
