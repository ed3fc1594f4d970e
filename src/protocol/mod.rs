//! The NunDB text protocol: splitting request text into commands, parsing a command line into a
//! [`Command`], formatting replies, and framing them on the wire. Pure functions, no I/O, safe
//! on any input.

mod command;
mod reply;
pub mod scan;
mod split;
pub mod wire;

pub use command::{Command, Strategy};
pub use reply::{Outcome, Takeover, ERROR_PREFIX, OK};
pub use split::{for_each_command, split_commands, VERBS};
pub use wire::Framing;
