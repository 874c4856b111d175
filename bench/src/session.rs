//! What every subscriber connection offers, whichever broker it talks to.
//!
//! A subscriber reads one WebSocket frame at a time and reports the
//! deliveries in it; the fan-out and idle scenarios are written against this
//! trait so that Herald and NATS runs share all their bookkeeping.

use std::future::Future;

use anyhow::Result;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::ws::BufferProfile;
use crate::{herald, nats};

/// Which broker protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Herald's client protocol (`sub`/`pub`/`msg` objects).
    Herald,
    /// The NATS client protocol over WebSocket.
    Nats,
}

impl Target {
    /// The URL used when none is given.
    pub fn default_url(self) -> &'static str {
        match self {
            Target::Herald => "ws://127.0.0.1:7400/ws",
            Target::Nats => "ws://127.0.0.1:8080",
        }
    }

    /// The broker's process name, for finding its pid.
    pub fn process_name(self) -> &'static str {
        match self {
            Target::Herald => "herald",
            Target::Nats => "nats-server",
        }
    }
}

/// Herald's wire codec (ignored for NATS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Text frames holding JSON (`herald.v1.json`).
    Json,
    /// Binary frames holding MessagePack (`herald.v1.msgpack`).
    Msgpack,
}

/// How subscribers read Herald frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParseMode {
    /// JSON: find `seq` and `data` by scanning bytes (falls back to a full
    /// parse for frames that are not plain `msg` objects). MessagePack: a
    /// borrowing decode.
    Scan,
    /// Decode every frame into a document.
    Full,
}

/// One message as a subscriber saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// `(index, sent_ns)` from the payload; `None` when it could not be read.
    pub payload: Option<(u64, u64)>,
    /// Herald's per-topic sequence number (NATS has none).
    pub seq: Option<u64>,
}

/// What reading one frame produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameOutcome {
    /// A frame was read; deliveries were appended; `server_errors` counts `err` replies.
    Data { server_errors: u32 },
    /// The server closed the connection, with this close code if it sent one.
    Closed { code: Option<u16> },
}

/// A subscribed connection.
pub trait SubscriberConn: Send + 'static {
    /// The topic's last sequence number when the subscription was confirmed (Herald only).
    fn subscribed_at_seq(&self) -> Option<u64>;

    /// Reads the next frame, appending its deliveries to `out`.
    fn next_frame(
        &mut self,
        out: &mut Vec<Delivery>,
    ) -> impl Future<Output = Result<FrameOutcome>> + Send;

    /// Closes the connection cleanly (bounded in time).
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// Everything needed to open one subscriber.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriberSettings {
    pub target: Target,
    pub codec: Codec,
    pub parse: ParseMode,
}

/// A subscriber of either kind.
pub enum AnySubscriber {
    Herald(herald::HeraldSubscriber),
    Nats(nats::NatsSubscriber),
}

impl AnySubscriber {
    /// Connects to `url` and subscribes to `topic`, returning once the broker confirmed it.
    pub async fn open(
        settings: &SubscriberSettings,
        url: &str,
        topic: &str,
        profile: BufferProfile,
    ) -> Result<Self> {
        Ok(match settings.target {
            Target::Herald => AnySubscriber::Herald(
                herald::HeraldSubscriber::open(url, settings.codec, settings.parse, topic, profile)
                    .await?,
            ),
            Target::Nats => {
                AnySubscriber::Nats(nats::NatsSubscriber::open(url, topic, profile).await?)
            }
        })
    }
}

impl SubscriberConn for AnySubscriber {
    fn subscribed_at_seq(&self) -> Option<u64> {
        match self {
            AnySubscriber::Herald(s) => s.subscribed_at_seq(),
            AnySubscriber::Nats(s) => s.subscribed_at_seq(),
        }
    }

    async fn next_frame(&mut self, out: &mut Vec<Delivery>) -> Result<FrameOutcome> {
        match self {
            AnySubscriber::Herald(s) => s.next_frame(out).await,
            AnySubscriber::Nats(s) => s.next_frame(out).await,
        }
    }

    async fn close(self) {
        match self {
            AnySubscriber::Herald(s) => s.close().await,
            AnySubscriber::Nats(s) => s.close().await,
        }
    }
}
