//! What the two processes of a handover say to each other, as JSON: the greeting, each client
//! handed over (with its socket passed alongside), and cancel requests the newer process
//! forwards for clients still on the older one.
//!
//! It must not do I/O (`wire` and `link` do).

use std::net::SocketAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One message of the handover link.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Message {
    /// Older → newer, first: who is handing over.
    Hello { instance: u64, version: String },
    /// Newer → older: go ahead.
    Welcome { instance: u64, version: String },
    /// Newer → older: no (the socket is the asker's own: no newer process bound it).
    Refused { reason: String },
    /// Older → newer: a client, its socket on this message.
    Client { id: u64, client: CarriedClient },
    /// Newer → older: the client `id` is the newer process's now; the older one may close
    /// its copy of the socket. Until then it keeps it, to tell the client if the newer process
    /// dies with the client in flight.
    Taken { id: u64 },
    /// Newer → older: a CancelRequest with a key the newer process did not issue.
    Cancel { id: u64, pid: i32, secret: i32 },
    /// Older → newer: whether a client held that key.
    Cancelled { id: u64, known: bool },
}

/// A client between transactions, as the newer process needs it to go on: who it is, what it
/// asked for at startup, the cancel key it was given and its named prepared statements.
#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedClient {
    pub tenant: String,
    pub user: String,
    pub settings: Vec<(String, String)>,
    pub peer: Option<SocketAddr>,
    pub cancel_key: (i32, i32),
    pub statements: Vec<CarriedStatement>,
}

/// A named prepared statement: the client's name and its Parse body after the name
/// (query, parameter types), base64.
#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedStatement {
    pub name: String,
    pub parse: String,
}

impl CarriedStatement {
    pub fn new(name: String, parse: &[u8]) -> CarriedStatement {
        CarriedStatement {
            name,
            parse: STANDARD.encode(parse),
        }
    }

    /// The name and Parse body; None if the body is not base64.
    pub fn decode(self) -> Option<(String, Bytes)> {
        let parse = STANDARD.decode(self.parse.as_bytes()).ok()?;
        Some((self.name, Bytes::from(parse)))
    }
}

impl Message {
    pub(super) fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    pub(super) fn decode(body: &[u8]) -> Result<Message, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_survives_the_round_trip() {
        let message = Message::Client {
            id: 3,
            client: CarriedClient {
                tenant: "acme".into(),
                user: "app".into(),
                settings: vec![("application_name".into(), "pgbench".into())],
                peer: Some("127.0.0.1:5000".parse().unwrap()),
                cancel_key: (12, -7),
                statements: vec![CarriedStatement::new(
                    "s1".into(),
                    b"SELECT $1\0\0\x01\0\0\0\x17",
                )],
            },
        };
        let Message::Client {
            id: 3,
            client: back,
        } = Message::decode(&message.encode().unwrap()).unwrap()
        else {
            panic!("not a client");
        };
        assert_eq!(back.cancel_key, (12, -7));
        let (name, parse) = back
            .statements
            .into_iter()
            .next()
            .unwrap()
            .decode()
            .unwrap();
        assert_eq!(
            (name.as_str(), &parse[..]),
            ("s1", &b"SELECT $1\0\0\x01\0\0\0\x17"[..])
        );
    }
}
