//! A relay direction's byte buffer, held only while bytes are in it.
//!
//! A client that is connected but quiet (most of them, on the many-tenant job) must cost
//! little more than its socket, so a direction does not own its 16 KiB for the life of the
//! session: it takes a buffer from its thread's free list when it is about to read and gives
//! it back when a read finds nothing and nothing is buffered (issue 12). Taking and giving
//! back is a `Vec` pop and push on the worker thread: no allocation on the forwarding path
//! once warm, no lock, no atomic. A task that moves to another worker gives its buffer to
//! that worker's list; each list keeps at most [`FREE_PER_THREAD`] buffers and frees the rest.
//!
//! It does not know frames or offsets: the relay's `Half` says when it is empty.

use std::cell::RefCell;

/// Bytes of each buffer: the most a direction reads at once.
pub(super) const RELAY_BUFFER_BYTES: usize = 16 * 1024;

/// Free buffers a thread keeps for the next reads (those of the clients it is serving at
/// once); more are freed. 64 × 16 KiB = 1 MiB per worker at most.
const FREE_PER_THREAD: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// One direction's buffer: `RELAY_BUFFER_BYTES` when held, nothing when released.
#[derive(Default)]
pub(super) struct RelayBuffer {
    held: Option<Box<[u8]>>,
}

impl RelayBuffer {
    /// The bytes, empty when no buffer is held (callers only read ranges they filled).
    pub(super) fn bytes(&self) -> &[u8] {
        self.held.as_deref().unwrap_or_default()
    }

    /// The bytes to write into, taking a buffer first if none is held.
    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        self.held.get_or_insert_with(take)
    }

    /// Whether a buffer is held now.
    pub(super) fn is_held(&self) -> bool {
        self.held.is_some()
    }

    /// Gives the buffer back to this thread's free list. Only when nothing in it is needed.
    pub(super) fn release(&mut self) {
        if let Some(buf) = self.held.take() {
            give_back(buf);
        }
    }
}

impl Drop for RelayBuffer {
    fn drop(&mut self) {
        self.release();
    }
}

fn take() -> Box<[u8]> {
    FREE.try_with(|free| free.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| vec![0u8; RELAY_BUFFER_BYTES].into_boxed_slice())
}

fn give_back(buf: Box<[u8]>) {
    // A thread being torn down drops the buffer instead.
    let _ = FREE.try_with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < FREE_PER_THREAD {
            free.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_a_buffer_only_between_taking_and_release() {
        let mut buf = RelayBuffer::default();
        assert!(!buf.is_held());
        assert!(buf.bytes().is_empty());
        buf.bytes_mut()[0] = 7;
        assert!(buf.is_held());
        assert_eq!(buf.bytes().len(), RELAY_BUFFER_BYTES);
        buf.release();
        assert!(!buf.is_held());
        assert!(buf.bytes().is_empty());
    }

    #[test]
    fn a_released_buffer_is_taken_again_without_allocating() {
        let mut first = RelayBuffer::default();
        let address = first.bytes_mut().as_ptr();
        first.release();
        let mut second = RelayBuffer::default();
        assert_eq!(
            second.bytes_mut().as_ptr(),
            address,
            "reused from the free list"
        );
    }
}
