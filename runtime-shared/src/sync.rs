//! The synchronisation types of every structure shared between threads.
//!
//! Normally these are `std::sync`'s. Built with `RUSTFLAGS="--cfg switchyard_loom"` they are
//! loom's, so the loom models (`loom_models.rs`) run the real code and explore its interleavings.
//! The cfg name is the project's own: a global `--cfg loom` would also switch smol's
//! dependencies (concurrent-queue) into loom mode.
//!
//! Only what a modelled structure uses goes through here. `Arc`s that merely share a structure
//! (a connection's queue, the node) stay `std::sync::Arc`: loom needs them only inside a model.

#[cfg(switchyard_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(switchyard_loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

#[cfg(not(switchyard_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(switchyard_loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};
