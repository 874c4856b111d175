//! Node-to-node frames: what Herald nodes say to each other over QUIC.
//!
//! Every frame is one MessagePack value (rmp-serde, struct fields as map
//! keys so that a newer node can add optional fields), carried in a
//! length-delimited stream. A connection opens with [`Hello`] in each
//! direction; after that only [`PeerFrame`]s flow. Topics, patterns and group
//! names are validated again when a frame is decoded: a peer's bug must not
//! become this node's bad state.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::data::Data;
use crate::topic::{GroupName, Pattern, Topic};

/// Bumped on any change a node of the previous version cannot read.
pub const PEER_PROTOCOL_VERSION: u16 = 1;

/// The ALPN name of Herald's node-to-node protocol.
pub const PEER_ALPN: &[u8] = b"herald-peer/1";

/// Largest node-to-node frame. Above a client message (1 MiB by default):
/// a replay carries several messages.
pub const MAX_PEER_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// The first frame on a connection, in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
    pub cluster: String,
    pub node_id: String,
    /// Changes on every start of the node (its start time in ms).
    pub generation: u64,
}

/// A subscription as the owner counts interest: pattern plus optional group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InterestKey {
    pub pattern: Pattern,
    pub group: Option<GroupName>,
}

/// W3C trace context as it rides on a message frame.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// A `traceparent` value.
    pub traceparent: Option<String>,
    /// A `tracestate` value, passed on verbatim.
    pub tracestate: Option<String>,
}

/// One retained message sent to a new subscriber's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replayed {
    pub seq: u64,
    pub data: Data,
    pub trace: TraceContext,
}

/// Why an owner refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The receiving node does not own the topic (its ring differs from the
    /// sender's); the sender retries after its ring changes.
    NotOwner,
    /// The receiving node is shutting down.
    Stopping,
}

/// Everything a node says to another after the hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// Ingress node to owner: sequence this message. With `req`, the owner
    /// answers [`PeerFrame::Published`] or [`PeerFrame::Refused`].
    Publish {
        req: Option<u64>,
        topic: Topic,
        data: Data,
        trace: TraceContext,
    },
    /// Owner to ingress node: the message `req` was sequenced.
    Published { req: u64, seq: u64, epoch: String },
    /// Owner to ingress node: request `req` was not carried out.
    Refused { req: u64, why: Refusal },
    /// Owner to a node with interest: deliver to local subscribers. `groups`
    /// are the queue groups this node serves for this message (one member
    /// each); plain subscribers always get it.
    Deliver {
        topic: Topic,
        seq: u64,
        data: Data,
        trace: TraceContext,
        groups: Vec<InterestKey>,
        /// When the owner sequenced it (µs since the Unix epoch), for the
        /// publish-to-deliver latency histogram.
        #[serde(default)]
        sequenced_at_us: u64,
    },
    /// A node to an exact topic's owner: record interest in `key` and answer
    /// with the topic's state ([`PeerFrame::Subscribed`]).
    Subscribe {
        req: u64,
        key: InterestKey,
        since: Option<u64>,
        epoch: Option<String>,
    },
    /// Owner to subscriber's node: the topic's state when the interest was
    /// recorded, and the retained messages after `since`. Every message
    /// sequenced later follows on the same stream.
    Subscribed {
        req: u64,
        seq: u64,
        epoch: String,
        recovered: Option<bool>,
        replay: Vec<Replayed>,
    },
    /// Interest with no reply data: re-registration after the ring moved,
    /// wildcard announcements (sent to every node), and removal. With `req`,
    /// the receiver answers [`PeerFrame::InterestAck`] once it holds it.
    Interest {
        req: Option<u64>,
        key: InterestKey,
        present: bool,
    },
    /// The interest change `req` is in place.
    InterestAck { req: u64 },
}

/// A frame that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum PeerCodecError {
    #[error("encoding a peer frame: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("decoding a peer frame: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

/// Encodes one value (a [`Hello`] or a [`PeerFrame`]) as MessagePack.
pub fn encode<T: Serialize>(value: &T) -> Result<Bytes, PeerCodecError> {
    // A message frame is a few hundred bytes: one allocation up front
    // instead of a series of doublings from empty.
    let mut out = Vec::with_capacity(256);
    rmp_serde::encode::write_named(&mut out, value)?;
    Ok(Bytes::from(out))
}

/// Decodes one value encoded by [`encode`].
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, PeerCodecError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pattern: &str, group: Option<&str>) -> InterestKey {
        InterestKey {
            pattern: Pattern::parse(pattern).expect("pattern"),
            group: group.map(|g| GroupName::parse(g).expect("group")),
        }
    }

    #[test]
    fn every_frame_round_trips() {
        let topic = Topic::parse("news.tech").expect("topic");
        let trace = TraceContext {
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            tracestate: Some("vendor=1".into()),
        };
        let frames = vec![
            PeerFrame::Publish {
                req: Some(7),
                topic: topic.clone(),
                data: Data::Json(Bytes::from_static(b"{\"a\":1}")),
                trace: trace.clone(),
            },
            PeerFrame::Published {
                req: u64::MAX,
                seq: 3,
                epoch: "e1".into(),
            },
            PeerFrame::Refused {
                req: 1,
                why: Refusal::NotOwner,
            },
            PeerFrame::Deliver {
                topic: topic.clone(),
                seq: 9,
                data: Data::Binary(Bytes::from_static(&[0, 1, 255])),
                trace: TraceContext::default(),
                groups: vec![key("news.*", Some("workers"))],
                sequenced_at_us: 1_764_000_000_000_000,
            },
            PeerFrame::Subscribe {
                req: 2,
                key: key("news.tech", None),
                since: Some(4),
                epoch: Some("e1".into()),
            },
            PeerFrame::Subscribed {
                req: 2,
                seq: 9,
                epoch: "e1".into(),
                recovered: Some(true),
                replay: vec![Replayed {
                    seq: 5,
                    data: Data::Msgpack(Bytes::from_static(&[0x81, 0xa1, b'k', 0x01])),
                    trace,
                }],
            },
            PeerFrame::Interest {
                req: None,
                key: key("a.>", None),
                present: false,
            },
            PeerFrame::InterestAck { req: 5 },
        ];
        for frame in frames {
            let bytes = encode(&frame).expect("encode");
            let back: PeerFrame = decode(&bytes).expect("decode");
            assert_eq!(back, frame);
        }
        let hello = Hello {
            version: PEER_PROTOCOL_VERSION,
            cluster: "herald".into(),
            node_id: "n1".into(),
            generation: 1_700_000_000_000,
        };
        assert_eq!(
            decode::<Hello>(&encode(&hello).expect("encode")).expect("decode"),
            hello
        );
    }

    #[test]
    fn binary_data_is_a_msgpack_bin_not_an_array() {
        let data = Data::Binary(Bytes::from(vec![7u8; 1000]));
        let bytes = encode(&data).expect("encode");
        assert!(bytes.len() < 1020, "{} bytes", bytes.len());
    }

    #[test]
    fn invalid_topics_from_a_peer_are_refused_at_decode() {
        #[derive(Serialize)]
        enum Forged {
            Publish {
                req: Option<u64>,
                topic: String,
                data: Data,
                trace: TraceContext,
            },
        }
        let forged = encode(&Forged::Publish {
            req: None,
            topic: "a..b".into(),
            data: Data::Json(Bytes::from_static(b"1")),
            trace: TraceContext::default(),
        })
        .expect("encode");
        assert!(decode::<PeerFrame>(&forged).is_err());
        assert!(decode::<PeerFrame>(&[0xc1, 0x00]).is_err());
    }
}
