//! Optional JWT auth: a token names the topic patterns its holder may
//! publish to and subscribe with.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use protocol::{Pattern, Topic};
use serde::Deserialize;

use crate::config::AuthConfig;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the RS256 public key {path}: {source}")]
    ReadKey {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid RS256 public key: {0}")]
    BadKey(jsonwebtoken::errors::Error),
    #[error("missing token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(jsonwebtoken::errors::Error),
    #[error("invalid pattern {pattern:?} in the token's claims")]
    BadClaim { pattern: String },
    #[error("the token has expired")]
    Expired,
}

/// What a verified token allows.
#[derive(Debug, Clone)]
pub struct Grants {
    publish: Vec<Pattern>,
    subscribe: Vec<Pattern>,
    expires_at: Option<u64>,
}

impl Grants {
    pub fn may_publish(&self, topic: &Topic) -> bool {
        self.publish.iter().any(|p| p.matches(topic))
    }

    pub fn may_subscribe(&self, pattern: &Pattern) -> bool {
        self.subscribe.iter().any(|p| p.covers(pattern))
    }

    /// Time left before the token expires, if it does: to the exact
    /// instant of `exp`, not to the start of its second.
    pub fn expires_in(&self) -> Option<Duration> {
        let exp = UNIX_EPOCH + Duration::from_secs(self.expires_at?);
        Some(
            exp.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        )
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    exp: Option<u64>,
}

pub struct Auth {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("algorithms", &self.validation.algorithms)
            .finish()
    }
}

impl Auth {
    /// The verifier the config asks for; `None` when auth is off.
    pub fn from_config(config: &AuthConfig) -> Result<Option<Auth>, AuthError> {
        let (key, algorithm) = if let Some(secret) = &config.hs256_secret {
            (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            )
        } else if let Some(path) = &config.rs256_public_key {
            let pem = std::fs::read(path).map_err(|source| AuthError::ReadKey {
                path: path.display().to_string(),
                source,
            })?;
            (
                DecodingKey::from_rsa_pem(&pem).map_err(AuthError::BadKey)?,
                Algorithm::RS256,
            )
        } else {
            return Ok(None);
        };
        let mut validation = Validation::new(algorithm);
        // `exp` is optional; when present it is checked, with no leeway, and
        // the session is closed (1008) when it passes.
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        Ok(Some(Auth { key, validation }))
    }

    pub fn verify(&self, token: Option<&str>) -> Result<Grants, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(AuthError::Invalid)?;
        // jsonwebtoken accepts a token during the second of its `exp`; RFC
        // 7519 says it must not be accepted on or after that instant.
        if let Some(exp) = data.claims.exp {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if now >= exp {
                return Err(AuthError::Expired);
            }
        }
        let parse = |patterns: Vec<String>| {
            patterns
                .into_iter()
                .map(|p| Pattern::parse(&p).map_err(|_| AuthError::BadClaim { pattern: p }))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Grants {
            publish: parse(data.claims.publish)?,
            subscribe: parse(data.claims.subscribe)?,
            expires_at: data.claims.exp,
        })
    }
}

/// The token of a request: `Authorization: Bearer …`, else the `token`
/// query parameter.
pub fn token_of(headers: &http::HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(value) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let mut parts = value.splitn(2, ' ');
        if parts
            .next()
            .is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
        {
            return parts.next().map(|t| t.trim().to_owned());
        }
    }
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == "token")
        .and_then(|(_, value)| crate::client::percent_decode(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn token(claims: serde_json::Value) -> String {
        encode(&Header::default(), &claims, &EncodingKey::from_secret(b"s")).expect("encode")
    }

    fn auth() -> Auth {
        Auth::from_config(&AuthConfig {
            hs256_secret: Some("s".into()),
            rs256_public_key: None,
        })
        .expect("config")
        .expect("enabled")
    }

    #[test]
    fn claims_grant_patterns() {
        let grants = auth()
            .verify(Some(&token(
                serde_json::json!({"publish":["a.>"],"subscribe":["b.*"]}),
            )))
            .expect("valid");
        assert!(grants.may_publish(&Topic::parse("a.x.y").expect("topic")));
        assert!(!grants.may_publish(&Topic::parse("b.x").expect("topic")));
        assert!(grants.may_subscribe(&Pattern::parse("b.x").expect("pattern")));
        assert!(!grants.may_subscribe(&Pattern::parse("b.>").expect("pattern")));
        assert!(grants.expires_in().is_none());
    }

    #[test]
    fn bad_tokens_are_refused() {
        let a = auth();
        assert!(matches!(a.verify(None), Err(AuthError::Missing)));
        assert!(a.verify(Some("nope")).is_err());
        let other = encode(
            &Header::default(),
            &serde_json::json!({}),
            &EncodingKey::from_secret(b"other"),
        )
        .expect("encode");
        assert!(a.verify(Some(&other)).is_err());
        assert!(a
            .verify(Some(&token(serde_json::json!({"exp": 1}))))
            .is_err());
        assert!(a
            .verify(Some(&token(serde_json::json!({"publish": ["a..b"]}))))
            .is_err());
    }

    #[test]
    fn token_comes_from_header_or_query() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(
            token_of(&headers, Some("a=1&token=x%2By")),
            Some("x+y".into())
        );
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(token_of(&headers, Some("token=x")), Some("abc".into()));
    }
}
