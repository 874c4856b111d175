//! Minting HS256 tokens with the claims Herald reads (`publish`,
//! `subscribe`, `exp`).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    i64::try_from(secs).expect("time fits i64")
}

/// An HS256 token over arbitrary claims.
pub fn token(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode token")
}

/// A token allowing these publish and subscribe patterns, valid for an hour.
pub fn grant(secret: &str, publish: &[&str], subscribe: &[&str]) -> String {
    token(
        secret,
        &json!({ "exp": now_secs() + 3600, "publish": publish, "subscribe": subscribe }),
    )
}
