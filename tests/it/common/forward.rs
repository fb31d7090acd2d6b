//! A loopback TCP forwarder in front of a server that sees the first 8 bytes of each
//! connection (SSLRequest, StartupMessage and CancelRequest all announce themselves there)
//! and either forwards the connection or answers it itself and hangs up.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the forwarder does with a connection, given its first 8 bytes.
pub enum Opening {
    /// To the server, those 8 bytes first, then both ways until either side closes.
    Forward,
    /// Writes these bytes back and closes: the server never hears of it.
    Answer(&'static [u8]),
}

/// Starts a forwarder to 127.0.0.1:`upstream`; returns its port. `decide` is asked once per
/// connection (it may record or count what it sees).
pub async fn forwarder<F>(upstream: u16, decide: F) -> u16
where
    F: Fn(&[u8; 8]) -> Opening + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let decide = std::sync::Arc::new(decide);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let decide = std::sync::Arc::clone(&decide);
            tokio::spawn(async move {
                let mut opening = [0u8; 8];
                if client.read_exact(&mut opening).await.is_err() {
                    return;
                }
                if let Opening::Answer(bytes) = decide(&opening) {
                    drop(client.write_all(bytes).await);
                    return;
                }
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    return;
                };
                if server.write_all(&opening).await.is_ok() {
                    drop(tokio::io::copy_bidirectional(&mut client, &mut server).await);
                }
            });
        }
    });
    port
}
