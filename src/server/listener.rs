//! The accept loop: one task per client, a global client limit that answers instead of
//! stalling, and accept errors (EMFILE) logged and backed off, never fatal. A peer in
//! `[proxy] proxy_protocol_from` is marked a balancer here; its client task reads the header. When it stops, the
//! connections already queued for it are accepted and served, not reset with the listener.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::State;
use super::client::{Peer, serve_client};
use crate::protocol::{SqlState, messages};

pub(super) async fn run(
    listener: TcpListener,
    state: Arc<State>,
    stop_accepting: CancellationToken,
    stop_sessions: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = stop_accepting.cancelled() => {
                serve_backlog(&listener, &state, &stop_sessions, &tasks);
                return;
            }
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        spawn_client(stream, peer, &state, &stop_sessions, &tasks);
    }
}

/// Stopping: the connections the kernel already queued for this listener are accepted and
/// served (they get the shutdown grace like every session) before the listener closes,
/// instead of being reset with it. With `reuse_port`, connections that arrive after this go
/// to the other process on the address.
fn serve_backlog(
    listener: &TcpListener,
    state: &Arc<State>,
    stop_sessions: &CancellationToken,
    tasks: &TaskTracker,
) {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut served = 0u32;
    while let std::task::Poll::Ready(Ok((stream, peer))) = listener.poll_accept(&mut cx) {
        spawn_client(stream, peer, state, stop_sessions, tasks);
        served += 1;
    }
    if served > 0 {
        tracing::info!(
            served,
            "accepted the connections queued before the listener closed"
        );
    }
}

fn spawn_client(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    state: &Arc<State>,
    stop_sessions: &CancellationToken,
    tasks: &TaskTracker,
) {
    tune_socket(&stream);
    let id = state.next_client_id.fetch_add(1, Ordering::Relaxed);
    // `peer` is the client's address. From a trusted balancer it is known only once the
    // PROXY header is read (`client` records it then); until then the line names the balancer.
    let span = tracing::info_span!(
        "client",
        id,
        peer = tracing::field::Empty,
        balancer = tracing::field::Empty,
        tenant = tracing::field::Empty,
        user = tracing::field::Empty
    );
    let from = if state
        .config
        .get()
        .proxy
        .proxy_protocol_from
        .contains(peer.ip())
    {
        span.record("balancer", tracing::field::display(peer));
        Peer::Balancer(peer)
    } else {
        span.record("peer", tracing::field::display(peer));
        Peer::Client(peer)
    };
    let Ok(permit) = Arc::clone(&state.client_slots).try_acquire_owned() else {
        tasks.spawn(refuse_too_many(stream).instrument(span));
        return;
    };
    let state = Arc::clone(state);
    let stop = stop_sessions.clone();
    tasks.spawn(
        async move {
            let reason = serve_client(&state, id, stream, from, &stop).await;
            reason.log();
            drop(permit);
        }
        .instrument(span),
    );
}

fn tune_socket(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    let keepalive = TcpKeepalive::new().with_time(Duration::from_secs(60));
    if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
}

async fn refuse_too_many(mut stream: TcpStream) {
    tracing::info!("refused: max_client_connections reached");
    let mut out = BytesMut::new();
    messages::error_response(
        &mut out,
        messages::Severity::Fatal,
        SqlState::TOO_MANY_CONNECTIONS,
        "sorry, too many clients already",
        None,
    );
    drop(tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await);
}
