//! Limits fixed by the contract (configurable ones have their defaults here).

/// Longest topic or pattern, in bytes.
pub const MAX_TOPIC_BYTES: usize = 255;
/// Longest queue group name, in bytes.
pub const MAX_GROUP_BYTES: usize = 255;
/// Longest `tracestate` carried with a message (W3C allows 512 characters).
pub const MAX_TRACESTATE_BYTES: usize = 512;
/// Largest message (`data`) by default.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Subscriptions per session by default.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 1024;
