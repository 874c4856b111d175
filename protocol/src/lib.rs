//! Herald's wire protocol, defined once: client requests and server replies,
//! the json and MessagePack codecs, topics and patterns, trace context.
//!
//! This crate is pure: no sockets, no async runtime. The node, the tests and
//! the bench tool all speak the protocol through it.

pub mod codec;
pub mod data;
pub mod error;
pub mod limits;
pub mod pattern_index;
pub mod peer;
pub mod reply;
pub mod request;
pub mod topic;
pub mod trace;

pub use codec::Codec;
pub use data::Data;
pub use error::ErrorCode;
pub use pattern_index::PatternIndex;
pub use reply::{MsgView, OkReply, Reply};
pub use request::{decode_frame, Request, RequestError};
pub use topic::{GroupName, Pattern, Topic, TopicError};
pub use trace::TraceParent;
