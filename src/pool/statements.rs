//! The shared prepared statements (`tg_...`) one backend connection holds, by server name: a
//! bounded record the transaction-mode statement rewriter (`session::statements`) keeps with
//! each backend, closing the least recently used one when it is full.
//!
//! It only counts names and uses; it never talks to the backend (the rewriter sends the Parse
//! and Close messages) and knows nothing about clients.

use std::collections::HashMap;
use std::sync::Arc;

/// Statements a backend keeps by default before the least recently used is closed.
pub const DEFAULT_CACHE_SIZE: usize = 200;

/// The statements prepared on one backend, by server name: a bounded cache. When a new one
/// would pass `capacity`, the least recently used is closed on the backend first, unless it was
/// used since the client's last Sync or Query (a portal of this batch may still need it): then
/// the cache grows for now.
#[derive(Debug)]
pub struct BackendStatements {
    last_used: HashMap<Arc<str>, u64>,
    clock: u64,
    /// `clock` at the client's last Sync or simple Query.
    batch_start: u64,
    pub capacity: usize,
}

impl Default for BackendStatements {
    fn default() -> Self {
        BackendStatements {
            last_used: HashMap::new(),
            clock: 0,
            batch_start: 0,
            capacity: DEFAULT_CACHE_SIZE,
        }
    }
}

impl BackendStatements {
    pub fn contains(&self, name: &str) -> bool {
        self.last_used.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.last_used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_used.is_empty()
    }

    pub fn clear(&mut self) {
        self.last_used.clear();
    }

    /// Records a use (or a new statement).
    pub(crate) fn touch(&mut self, name: &Arc<str>) {
        self.clock += 1;
        match self.last_used.get_mut(name) {
            Some(at) => *at = self.clock,
            None => {
                self.last_used.insert(Arc::clone(name), self.clock);
            }
        }
    }

    pub(crate) fn remove(&mut self, name: &str) {
        self.last_used.remove(name);
    }

    /// The client reached a Sync or a simple Query.
    pub(crate) fn batch_boundary(&mut self) {
        self.batch_start = self.clock;
    }

    /// The statement to close before adding one, if the cache is full and one may go.
    pub(crate) fn victim(&self) -> Option<Arc<str>> {
        if self.last_used.len() < self.capacity.max(1) {
            return None;
        }
        self.last_used
            .iter()
            .filter(|(_, at)| **at <= self.batch_start)
            .min_by_key(|(_, at)| **at)
            .map(|(name, _)| Arc::clone(name))
    }
}
