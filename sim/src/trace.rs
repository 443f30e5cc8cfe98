//! The run's story: one line per step, `(now offset, actor, event)`, folded into a stable hash.

use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::time::Duration;

/// How many recent lines are kept for a failure report when the full trace is not recorded.
const TAIL: usize = 80;

/// An append-only trace with a running FNV-1a hash.
#[derive(Debug)]
pub(crate) struct Trace {
    hash: u64,
    lines: u64,
    all: Option<Vec<String>>,
    tail: VecDeque<String>,
}

impl Trace {
    pub(crate) fn new(record: bool) -> Trace {
        Trace {
            hash: 0xcbf2_9ce4_8422_2325,
            lines: 0,
            all: record.then(Vec::new),
            tail: VecDeque::with_capacity(TAIL),
        }
    }

    /// Appends `at actor event`.
    pub(crate) fn push(
        &mut self,
        at: Duration,
        actor: fmt::Arguments<'_>,
        event: fmt::Arguments<'_>,
    ) {
        let mut line = String::with_capacity(64);
        let _ = write!(
            line,
            "{:>5}.{:06} {actor} {event}",
            at.as_secs(),
            at.subsec_micros()
        );
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.lines += 1;
        if self.tail.len() == TAIL {
            self.tail.pop_front();
        }
        if let Some(all) = &mut self.all {
            all.push(line.clone());
        }
        self.tail.push_back(line);
    }

    pub(crate) fn hash(&self) -> u64 {
        self.hash
    }

    pub(crate) fn len(&self) -> u64 {
        self.lines
    }

    pub(crate) fn lines(&self) -> Option<&[String]> {
        self.all.as_deref()
    }

    /// The most recent lines, oldest first.
    pub(crate) fn tail(&self) -> impl Iterator<Item = &str> {
        self.tail.iter().map(String::as_str)
    }
}
