//! The parts of the runtime that do not depend on tokio: reading a request head over any
//! futures-io reader, the frame scanner, the shard → connection hand-off and the connection
//! driver over async-tungstenite. They are kept apart so they can move to a crate shared with the
//! smol runtime.

pub mod driver;
pub mod head;
pub mod http;
pub mod queue;
pub mod scanner;
