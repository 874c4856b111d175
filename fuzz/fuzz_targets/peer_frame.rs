//! A frame from another node, as the peer transport decodes it.
//!
//! Peers are authenticated, but a peer's bug must not become this node's
//! panic or bad state: decoding never panics, and whatever decodes survives
//! an encode/decode round trip unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::peer::{self, Hello, PeerFrame};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(frame) = peer::decode::<PeerFrame>(bytes) {
        let again = peer::encode(&frame).expect("a decoded frame encodes");
        let back: PeerFrame = peer::decode(&again).expect("an encoded frame decodes");
        assert_eq!(back, frame);
    }
    if let Ok(hello) = peer::decode::<Hello>(bytes) {
        let again = peer::encode(&hello).expect("a decoded hello encodes");
        assert_eq!(peer::decode::<Hello>(&again).expect("decodes"), hello);
    }
});
