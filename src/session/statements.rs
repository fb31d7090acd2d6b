//! Named prepared statements under transaction pooling.
//!
//! A client's statements outlive its transactions, but each transaction may run on another
//! backend. So tenantgate remembers each client's named statements (name → query and parameter
//! types), gives each distinct statement one backend-side name (`tg_` + a SHA-256 prefix of its
//! text, so clients that prepare the same query share it), prepares it lazily on whichever
//! backend serves the next Bind or Describe, and rewrites the names in Parse, Bind, Describe and
//! Close. What the client did not ask for is hidden from it: a ParseComplete for a Parse we
//! added is swallowed, and one for a Parse we skipped (already prepared there) is made up, in
//! order. For that, [`Responses`] follows which response answers which request.
//!
//! This module decides; the relay moves the bytes (forward, swallow, splice). It must not
//! decode row data: it reads only statement names, and Parse bodies whole.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::pool::BackendStatements;
use crate::protocol::frame::{FrameHead, HEADER_BYTES, Scan};

/// One statement as the client prepared it.
#[derive(Debug)]
pub struct Statement {
    /// Name on every backend.
    pub server_name: Arc<str>,
    /// The Parse body after the statement name: query, parameter count, parameter types.
    pub parse_rest: Bytes,
}

/// The statements one client has prepared, by the client's names.
#[derive(Debug, Default)]
pub struct ClientStatements {
    by_name: HashMap<String, Arc<Statement>>,
    /// Bytes kept for them (names and Parse bodies).
    bytes: usize,
    /// A message too large to rewrite went through untouched (a Parse over the relay
    /// buffer, say): the client must keep its backend from now on.
    pub needs_pin: bool,
    pub limits: StatementLimits,
}

/// How much one client may keep prepared (`[pool] max_prepared_statements_per_client`,
/// `max_prepared_statement_bytes_per_client`). 0 is no limit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatementLimits {
    pub count: usize,
    pub bytes: usize,
}

/// Most responses one client may have owed at once (requests sent and not yet answered):
/// a client that pipelines more without reading its answers is closed with 54000, so the
/// queue cannot grow without bound. About 32 bytes each.
pub const MAX_OWED_RESPONSES: usize = 100_000;

/// What a client went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    #[error(
        "too many prepared statements for one client (limit {0}): close some (Close, DEALLOCATE) or raise [pool] max_prepared_statements_per_client"
    )]
    Statements(usize),
    #[error(
        "prepared statements of one client over {0} bytes: close some (Close, DEALLOCATE) or raise [pool] max_prepared_statement_bytes_per_client"
    )]
    StatementBytes(usize),
    #[error(
        "too many statements prepared on one backend connection within one batch (limit {0}): send a Sync"
    )]
    BackendStatements(usize),
    #[error(
        "more than {MAX_OWED_RESPONSES} requests sent without reading their answers: read the answers as they come"
    )]
    OwedResponses,
}

impl ClientStatements {
    /// The client's statements as (name, Parse body after the name), to carry them to
    /// another process (handover).
    pub fn export(&self) -> Vec<(String, Bytes)> {
        self.by_name
            .iter()
            .map(|(name, statement)| (name.clone(), statement.parse_rest.clone()))
            .collect()
    }

    /// Statements carried from another process, under this process's limits: each gets its
    /// backend-side name from its text, as if the client had prepared it here. Fails, keeping
    /// what fit, when they break a limit.
    pub fn import(
        &mut self,
        carried: impl IntoIterator<Item = (String, Bytes)>,
    ) -> Result<(), LimitExceeded> {
        for (name, parse_rest) in carried {
            let statement = Arc::new(Statement {
                server_name: server_name(&parse_rest),
                parse_rest,
            });
            self.keep(&name, &statement)?;
        }
        Ok(())
    }

    fn forget(&mut self, name: &str) -> bool {
        match self.by_name.remove(name) {
            Some(old) => {
                self.bytes = self.bytes.saturating_sub(weight(name, &old));
                true
            }
            None => false,
        }
    }

    fn forget_all(&mut self) {
        self.by_name.clear();
        self.bytes = 0;
    }

    /// Keeps `statement` under `name`, or says which limit it would break.
    fn keep(&mut self, name: &str, statement: &Arc<Statement>) -> Result<(), LimitExceeded> {
        let old = self.by_name.get(name).map_or(0, |old| weight(name, old));
        let bytes = self.bytes - old + weight(name, statement);
        let count = self.by_name.len() + usize::from(old == 0);
        if self.limits.count > 0 && count > self.limits.count {
            return Err(LimitExceeded::Statements(self.limits.count));
        }
        if self.limits.bytes > 0 && bytes > self.limits.bytes {
            return Err(LimitExceeded::StatementBytes(self.limits.bytes));
        }
        self.by_name.insert(name.to_owned(), Arc::clone(statement));
        self.bytes = bytes;
        Ok(())
    }
}

/// What keeping `statement` under `name` costs.
fn weight(name: &str, statement: &Statement) -> usize {
    name.len() + statement.parse_rest.len()
}

/// What a response will be, in request order.
#[derive(Debug)]
enum Expect {
    /// Answer to a Close we added to make room in the backend's cache (swallowed).
    Evicted {
        name: Arc<str>,
    },
    /// Answer to a Parse we forwarded (`swallow`: one we added).
    ParseComplete {
        name: Option<Arc<str>>,
        swallow: bool,
    },
    BindComplete,
    CloseComplete,
    /// ParameterDescription, then RowDescription or NoData.
    DescribeStatement,
    /// RowDescription or NoData.
    DescribePortal,
    /// Rows, then CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    Sync,
    /// A simple Query or FunctionCall: everything up to ReadyForQuery.
    Query,
    /// A response we make up for a request we did not forward.
    Inject(u8),
    /// The answer to a DEALLOCATE we handled: CommandComplete, then ReadyForQuery.
    InjectDeallocate,
}

/// Requests in flight and what their responses need.
#[derive(Debug, Default)]
pub struct Responses {
    queue: VecDeque<Expect>,
    /// The backend may no longer have the statements we believe prepared there (a client
    /// query may have run DEALLOCATE or DISCARD; the server said one is missing, exists
    /// already, or is stale).
    statements_suspect: bool,
    /// The reset sent ahead of this client's first messages, until the backend answers it.
    reset: ResetAhead,
    /// Why the reset failed (SQLSTATE and message), when it did.
    reset_failure: String,
    /// The server reads COPY data and ignores Syncs (see `TxTracker::copy_in`).
    copy_in: bool,
    /// A Sync, Query or FunctionCall of the client's went to the backend with the reset sent
    /// ahead: the server flushes the reset's answers with the answers to it, so the reset's
    /// own Flush is not needed (see [`Responses::reset_needs_flush`]).
    reset_answer_requested: bool,
    /// The client went over a limit: the relay ends with this error (the frame that broke it
    /// is held, never forwarded).
    limit_exceeded: Option<LimitExceeded>,
}

/// A reset (`DISCARD ALL`, as Parse/Bind/Execute without a Sync: see [`RESET_AHEAD`]) sent
/// in the same write as a new client's first messages. If it fails, the server skips
/// everything up to the next Sync, so the client's first messages never run in the last
/// client's session; messages after them are held here until the reset has succeeded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ResetAhead {
    #[default]
    None,
    /// Sent, not answered; the client's first Sync, Query or FunctionCall not seen yet.
    Sent,
    /// Sent, not answered; the client's first Sync, Query or FunctionCall went with it:
    /// hold everything after it.
    SentHolding,
    /// The backend answered it with an error (or something else than its answer).
    Failed,
}

/// `DISCARD ALL` as Parse, Bind and Execute of the unnamed statement and portal, then a
/// Flush, no Sync: after an error in any of them the server skips every message up to the
/// next Sync. It commits at once (DISCARD ALL cannot run in a transaction block, so the
/// server ends its implicit transaction right after it) and answers ParseComplete,
/// BindComplete and CommandComplete, which are swallowed. The Flush makes it answer even
/// when the client's messages ask for nothing (a DEALLOCATE answered here); when a Sync,
/// Query or FunctionCall of the client's goes in the same write it is dropped before the
/// write ([`Responses::reset_needs_flush`]), sparing the server a send of its own.
pub const RESET_AHEAD: &[u8] = b"P\0\0\0\x13\0DISCARD ALL\0\0\0\
B\0\0\0\x0c\0\0\0\0\0\0\0\0\
E\0\0\0\x09\0\0\0\0\0\
H\0\0\0\x04";

/// What the relay does with a backend message while a reset sent ahead is unanswered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetFrame {
    /// No reset in flight: the message is the client's business.
    NotReset,
    /// Part of the reset's answer: swallow it.
    Swallow,
    /// The reset failed: stop before this message; the backend must be closed.
    Failed,
}

/// SQLSTATEs that mean a shared statement is not as we believe: 26000 (does not exist),
/// 42P05 (already exists), 0A000 (cached plan must not change result type), XX000 (cache
/// lookup failed, after a DROP TYPE).
const STATEMENT_TROUBLE: &[&[u8; 5]] = &[b"26000", b"42P05", b"0A000", b"XX000"];

/// The SQLSTATE field of an ErrorResponse body (the prefix that has arrived).
fn error_code(body: &[u8]) -> Option<&[u8]> {
    error_field(body, b'C')
}

/// One field of an ErrorResponse body (the prefix that has arrived).
fn error_field(body: &[u8], name: u8) -> Option<&[u8]> {
    let mut rest = body;
    while let Some((field, after)) = rest.split_first() {
        if *field == 0 {
            return None;
        }
        let (value, after) = cstr(after)?;
        if *field == name {
            return Some(value);
        }
        rest = after;
    }
    None
}

/// Whether a query text may deallocate or discard prepared statements (any case, anywhere:
/// `SELECT 1; DEALLOCATE ALL`, a DO block that EXECUTEs it). A text not wholly here counts.
fn may_drop_statements(body: &[u8], whole: bool) -> bool {
    if !whole {
        return true;
    }
    body.windows(7)
        .any(|w| w.eq_ignore_ascii_case(b"dealloc") || w.eq_ignore_ascii_case(b"discard"))
}

fn cstr(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = bytes.iter().position(|b| *b == 0)?;
    let (s, rest) = bytes.split_at(nul);
    Some((s, rest.get(1..).unwrap_or_default()))
}

fn server_name(parse_rest: &[u8]) -> Arc<str> {
    let digest = Sha256::digest(parse_rest);
    let mut name = String::with_capacity(3 + 32);
    name.push_str("tg_");
    for b in digest.iter().take(16) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        name.push(char::from(HEX[usize::from(b >> 4)]));
        name.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    Arc::from(name)
}

fn put_len_message(out: &mut BytesMut, tag: u8, body_len: usize) {
    out.put_u8(tag);
    out.put_u32(u32::try_from(body_len + 4).unwrap_or(u32::MAX));
}

fn put_parse(out: &mut BytesMut, statement: &Statement) {
    put_len_message(
        out,
        b'P',
        statement.server_name.len() + 1 + statement.parse_rest.len(),
    );
    out.put_slice(statement.server_name.as_bytes());
    out.put_u8(0);
    out.put_slice(&statement.parse_rest);
}

/// The per-client, per-backend view the relay hands to [`on_client_frame`].
pub struct StatementContext<'a> {
    pub client: &'a mut ClientStatements,
    pub backend: &'a mut BackendStatements,
    pub responses: &'a mut Responses,
}

/// Decides what to do with one client message. Fills `splice` when it returns
/// `Scan::Splice`.
pub fn on_client_frame(
    ctx: &mut StatementContext<'_>,
    head: &FrameHead<'_>,
    splice: &mut BytesMut,
) -> Scan {
    match ctx.responses.reset {
        // Nothing after the first Sync or Query goes before the reset has succeeded.
        ResetAhead::SentHolding | ResetAhead::Failed => return Scan::Hold,
        ResetAhead::Sent if matches!(head.tag, b'S' | b'Q' | b'F') => {
            ctx.responses.reset = ResetAhead::SentHolding;
        }
        ResetAhead::Sent | ResetAhead::None => {}
    }
    if ctx.responses.queue.len() >= MAX_OWED_RESPONSES {
        return refuse(ctx, LimitExceeded::OwedResponses);
    }
    match head.tag {
        b'P' => on_parse(ctx, head, splice),
        b'B' => on_bind(ctx, head, splice),
        b'D' | b'C' => on_describe_or_close(ctx, head, splice),
        b'E' => {
            ctx.responses.queue.push_back(Expect::Execute);
            Scan::Continue
        }
        // Ignored by a server reading COPY data: no answer comes.
        b'S' if ctx.responses.copy_in => Scan::Continue,
        b'S' => {
            ctx.backend.batch_boundary();
            ctx.responses.queue.push_back(Expect::Sync);
            Scan::Continue
        }
        b'c' | b'f' => {
            ctx.responses.copy_in = false;
            Scan::Continue
        }
        b'Q' => {
            ctx.backend.batch_boundary();
            on_query(ctx, head)
        }
        b'F' => {
            ctx.responses.queue.push_back(Expect::Query);
            Scan::Continue
        }
        _ => Scan::Continue,
    }
}

/// What a `DEALLOCATE` names.
#[derive(Debug, PartialEq, Eq)]
enum Deallocate {
    All,
    Name(String),
}

/// Recognizes a simple query that is only `DEALLOCATE [PREPARE] name | ALL` (drivers such as
/// psycopg on an older libpq send it for protocol-level statements).
fn parse_deallocate(body: &[u8]) -> Option<Deallocate> {
    let (text, _) = cstr(body)?;
    let text = std::str::from_utf8(text)
        .ok()?
        .trim()
        .trim_end_matches(';')
        .trim();
    let mut words = text.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("deallocate") {
        return None;
    }
    let mut target = words.next()?;
    if target.eq_ignore_ascii_case("prepare") {
        target = words.next()?;
    }
    if words.next().is_some() {
        return None;
    }
    if target.eq_ignore_ascii_case("all") {
        return Some(Deallocate::All);
    }
    let name = match target.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => target.to_ascii_lowercase(),
    };
    Some(Deallocate::Name(name))
}

/// Whether a query whose text is not all here yet may be one [`parse_deallocate`] answers:
/// its first word so far is `DEALLOCATE`, or the start of it, or nothing yet.
fn may_be_deallocate(partial: &[u8]) -> bool {
    const WORD: &[u8] = b"deallocate";
    let text = partial.trim_ascii_start();
    let n = text.len().min(WORD.len());
    text.get(..n)
        .zip(WORD.get(..n))
        .is_some_and(|(have, word)| have.eq_ignore_ascii_case(word))
}

/// Query: a DEALLOCATE of the client's own protocol statements is answered here (the backend
/// knows them under other names and shares them with other clients); anything else goes on.
/// A query that may be one and is not all here yet is waited for (it fits in the relay
/// buffer), so how the client's bytes were cut never decides where it goes.
fn on_query(ctx: &mut StatementContext<'_>, head: &FrameHead<'_>) -> Scan {
    if head.body.len() < head.body_len
        && HEADER_BYTES + head.body_len <= super::relay_buffer::RELAY_BUFFER_BYTES
        && may_be_deallocate(head.body)
    {
        return Scan::Hold;
    }
    if head.body.len() == head.body_len {
        let handled = match parse_deallocate(head.body) {
            Some(Deallocate::All) => {
                ctx.client.forget_all();
                true
            }
            Some(Deallocate::Name(name)) => ctx.client.forget(&name),
            None => false,
        };
        if handled {
            ctx.responses.queue.push_back(Expect::InjectDeallocate);
            return Scan::Splice {
                consume: HEADER_BYTES + head.body_len,
            };
        }
    }
    if !ctx.backend.is_empty() && may_drop_statements(head.body, head.body.len() == head.body_len) {
        ctx.responses.statements_suspect = true;
    }
    ctx.responses.queue.push_back(Expect::Query);
    Scan::Continue
}

/// Parse: remember a named statement; send it under its server name, or not at all when
/// this backend has it already (and answer it ourselves).
fn on_parse(ctx: &mut StatementContext<'_>, head: &FrameHead<'_>, splice: &mut BytesMut) -> Scan {
    let Some((name, rest)) = cstr(head.body) else {
        return hold(ctx, head);
    };
    if name.is_empty() {
        if !ctx.backend.is_empty()
            && may_drop_statements(head.body, head.body.len() == head.body_len)
        {
            ctx.responses.statements_suspect = true;
        }
        ctx.responses.queue.push_back(Expect::ParseComplete {
            name: None,
            swallow: false,
        });
        return Scan::Continue;
    }
    if head.body.len() != head.body_len {
        return hold(ctx, head);
    }
    let Ok(name) = std::str::from_utf8(name) else {
        return Scan::Continue;
    };
    let statement = Arc::new(Statement {
        server_name: server_name(rest),
        parse_rest: Bytes::copy_from_slice(rest),
    });
    // Within a batch nothing is evicted on the backend: bound what one batch may add.
    let backend_limit = ctx.backend.capacity.max(1) + ctx.client.limits.count;
    if ctx.client.limits.count > 0 && ctx.backend.len() >= backend_limit {
        return refuse(ctx, LimitExceeded::BackendStatements(backend_limit));
    }
    if let Err(exceeded) = ctx.client.keep(name, &statement) {
        return refuse(ctx, exceeded);
    }
    if ctx.backend.contains(&statement.server_name) {
        // Prepared here before, maybe before a DDL changed what it means (a table altered, a
        // type dropped and made again): a client that parses now must get what a direct
        // connection would, so it is prepared again (closed first, answer swallowed).
        close_on_backend(ctx, &statement.server_name, splice);
    } else {
        make_room(ctx, splice);
    }
    put_parse(splice, &statement);
    ctx.backend.touch(&statement.server_name);
    ctx.responses.queue.push_back(Expect::ParseComplete {
        name: Some(Arc::clone(&statement.server_name)),
        swallow: false,
    });
    Scan::Splice {
        consume: HEADER_BYTES + head.body_len,
    }
}

/// Holds the frame and ends the relay with `exceeded` (see `Responses::limit_exceeded`).
fn refuse(ctx: &mut StatementContext<'_>, exceeded: LimitExceeded) -> Scan {
    ctx.responses.limit_exceeded = Some(exceeded);
    Scan::Hold
}

/// Bind: prepare the statement here first if needed, and use its server name.
fn on_bind(ctx: &mut StatementContext<'_>, head: &FrameHead<'_>, splice: &mut BytesMut) -> Scan {
    let Some((portal, rest)) = cstr(head.body) else {
        return hold(ctx, head);
    };
    let Some((name, _)) = cstr(rest) else {
        return hold(ctx, head);
    };
    let Some(statement) = lookup(ctx.client, name) else {
        ctx.responses.queue.push_back(Expect::BindComplete);
        return Scan::Continue;
    };
    // The Parse we may add goes first on the wire, so its answer comes first.
    ensure_prepared(ctx, &statement, splice);
    ctx.responses.queue.push_back(Expect::BindComplete);
    let old_prefix = portal.len() + 1 + name.len() + 1;
    let new_prefix = portal.len() + 1 + statement.server_name.len() + 1;
    let body_len = head.body_len - old_prefix + new_prefix;
    put_len_message(splice, b'B', body_len);
    splice.put_slice(portal);
    splice.put_u8(0);
    splice.put_slice(statement.server_name.as_bytes());
    splice.put_u8(0);
    Scan::Splice {
        consume: HEADER_BYTES + old_prefix,
    }
}

/// Describe and Close of a named statement: Describe uses the server name (preparing it
/// first if needed); Close only forgets the client's name, since the backend statement may
/// serve other clients, and is answered by us.
fn on_describe_or_close(
    ctx: &mut StatementContext<'_>,
    head: &FrameHead<'_>,
    splice: &mut BytesMut,
) -> Scan {
    let Some((kind, rest)) = head.body.split_first() else {
        return hold(ctx, head);
    };
    let Some((name, _)) = cstr(rest) else {
        return hold(ctx, head);
    };
    let is_statement = *kind == b'S';
    let plain = if head.tag == b'C' {
        Expect::CloseComplete
    } else if is_statement {
        Expect::DescribeStatement
    } else {
        Expect::DescribePortal
    };
    if !is_statement || name.is_empty() {
        ctx.responses.queue.push_back(plain);
        return Scan::Continue;
    }
    if head.tag == b'C' {
        if let Ok(name) = std::str::from_utf8(name) {
            ctx.client.forget(name);
        }
        ctx.responses.queue.push_back(Expect::Inject(b'3'));
        return Scan::Splice {
            consume: HEADER_BYTES + head.body_len,
        };
    }
    let Some(statement) = lookup(ctx.client, name) else {
        ctx.responses.queue.push_back(plain);
        return Scan::Continue;
    };
    ensure_prepared(ctx, &statement, splice);
    ctx.responses.queue.push_back(plain);
    put_len_message(splice, b'D', 1 + statement.server_name.len() + 1);
    splice.put_u8(b'S');
    splice.put_slice(statement.server_name.as_bytes());
    splice.put_u8(0);
    Scan::Splice {
        consume: HEADER_BYTES + head.body_len,
    }
}

/// Waits for more of a frame whose names (or, for Parse, whole body) are not here yet. Up to
/// a relay buffer of it can be waited for; past that it goes through untouched and the client
/// is pinned to this backend, where its names mean what it thinks.
fn hold(ctx: &mut StatementContext<'_>, head: &FrameHead<'_>) -> Scan {
    if head.body.len() == head.body_len {
        // All of it is here and still malformed: more bytes would not help. The backend
        // answers it with its own protocol error (holding it would hang the client).
        Scan::Continue
    } else if head.body.len() + HEADER_BYTES < super::relay_buffer::RELAY_BUFFER_BYTES {
        Scan::Hold
    } else {
        ctx.client.needs_pin = true;
        Scan::Continue
    }
}

fn lookup(client: &ClientStatements, name: &[u8]) -> Option<Arc<Statement>> {
    if name.is_empty() {
        return None;
    }
    let name = std::str::from_utf8(name).ok()?;
    client.by_name.get(name).cloned()
}

/// Adds a Parse for `statement` to `splice` if the backend does not have it yet.
fn ensure_prepared(ctx: &mut StatementContext<'_>, statement: &Statement, splice: &mut BytesMut) {
    if ctx.backend.contains(&statement.server_name) {
        ctx.backend.touch(&statement.server_name);
        return;
    }
    make_room(ctx, splice);
    put_parse(splice, statement);
    ctx.backend.touch(&statement.server_name);
    ctx.responses.queue.push_back(Expect::ParseComplete {
        name: Some(Arc::clone(&statement.server_name)),
        swallow: true,
    });
}

/// Closes the backend's least recently used statement when its cache is full.
fn make_room(ctx: &mut StatementContext<'_>, splice: &mut BytesMut) {
    if let Some(victim) = ctx.backend.victim() {
        close_on_backend(ctx, &victim, splice);
    }
}

/// Adds a Close of a backend statement to `splice`; its answer is swallowed.
fn close_on_backend(ctx: &mut StatementContext<'_>, name: &Arc<str>, splice: &mut BytesMut) {
    put_len_message(splice, b'C', 1 + name.len() + 1);
    splice.put_u8(b'S');
    splice.put_slice(name.as_bytes());
    splice.put_u8(0);
    ctx.backend.remove(name);
    ctx.responses.queue.push_back(Expect::Evicted {
        name: Arc::clone(name),
    });
}

impl Responses {
    /// Made-up responses whose turn has come, appended to `out`; `status` is the transaction
    /// status for a made-up ReadyForQuery. Returns whether one was made.
    pub fn take_injections(&mut self, out: &mut BytesMut, status: u8) -> bool {
        let mut ready_for_query = false;
        loop {
            match self.queue.front() {
                Some(Expect::Inject(tag)) => put_len_message(out, *tag, 0),
                Some(Expect::InjectDeallocate) => {
                    const TAG: &[u8] = b"DEALLOCATE\0";
                    put_len_message(out, b'C', TAG.len());
                    out.put_slice(TAG);
                    put_len_message(out, b'Z', 1);
                    out.put_u8(status);
                    ready_for_query = true;
                }
                _ => return ready_for_query,
            }
            self.queue.pop_front();
        }
    }

    /// True when a made-up response is due before the next backend message.
    /// The limit a client went over, if it did: the relay must end.
    pub fn limit_exceeded(&self) -> Option<LimitExceeded> {
        self.limit_exceeded
    }

    pub fn injection_due(&self) -> bool {
        matches!(
            self.queue.front(),
            Some(Expect::Inject(_) | Expect::InjectDeallocate)
        )
    }

    /// Forgets everything, keeping the queue's memory: a new transaction starts.
    pub fn clear(&mut self) {
        self.queue.clear();
        self.statements_suspect = false;
        self.reset = ResetAhead::None;
        self.reset_failure.clear();
        self.copy_in = false;
        self.reset_answer_requested = false;
    }

    /// [`RESET_AHEAD`] goes to the backend before the client's first message.
    pub fn reset_sent(&mut self) {
        self.reset = ResetAhead::Sent;
        self.reset_answer_requested = false;
    }

    /// The client's message `tag` goes to the backend as it is.
    pub fn forwarded(&mut self, tag: u8) {
        if matches!(tag, b'S' | b'Q' | b'F') && !self.copy_in && self.reset_in_flight() {
            self.reset_answer_requested = true;
        }
    }

    /// Whether the reset sent ahead needs its Flush: no Sync, Query or FunctionCall of the
    /// client's has gone to the backend since, so nothing else makes the server send the
    /// reset's answers, which the relay waits for.
    pub fn reset_needs_flush(&self) -> bool {
        !self.reset_answer_requested
    }

    /// A reset sent ahead has not been answered yet: the backend is not between requests.
    pub fn reset_in_flight(&self) -> bool {
        matches!(self.reset, ResetAhead::Sent | ResetAhead::SentHolding)
    }

    /// The reset sent ahead failed: SQLSTATE and message, as the server said them.
    pub fn reset_failure(&self) -> Option<&str> {
        (self.reset == ResetAhead::Failed).then_some(self.reset_failure.as_str())
    }

    /// Follows one backend message while a reset sent ahead may be unanswered (`body`: the
    /// part of it that has arrived).
    pub fn on_reset_frame(&mut self, tag: u8, body: &[u8]) -> ResetFrame {
        match (self.reset, tag) {
            (ResetAhead::None, _) => ResetFrame::NotReset,
            (ResetAhead::Failed, _) => ResetFrame::Failed,
            // ParseComplete, BindComplete; a notice or a notification for the last client.
            (_, b'1' | b'2' | b'N' | b'A') => ResetFrame::Swallow,
            // Reported at the client's ReadyForQuery, after its own results.
            (_, b'S') => ResetFrame::NotReset,
            (_, b'C') => {
                self.reset = ResetAhead::None;
                ResetFrame::Swallow
            }
            (_, _) => {
                self.reset = ResetAhead::Failed;
                self.reset_failure = if tag == b'E' {
                    let field = |name: u8| {
                        error_field(body, name)
                            .map(String::from_utf8_lossy)
                            .unwrap_or_default()
                    };
                    format!("{} {}", field(b'C'), field(b'M'))
                } else {
                    format!(
                        "unexpected message '{}' instead of its answer",
                        char::from(tag).escape_default()
                    )
                };
                ResetFrame::Failed
            }
        }
    }

    /// The backend's prepared statements may not be what its cache says: reset it before
    /// its next use.
    pub fn statements_suspect(&self) -> bool {
        self.statements_suspect
    }

    /// Follows one backend message (`body`: the part of it that has arrived). Returns
    /// whether to swallow it.
    pub fn on_backend_frame(
        &mut self,
        tag: u8,
        body: &[u8],
        backend: &mut BackendStatements,
    ) -> bool {
        if tag == b'E' && !backend.is_empty() {
            if let Some(code) = error_code(body) {
                if STATEMENT_TROUBLE.iter().any(|c| c.as_slice() == code) {
                    self.statements_suspect = true;
                }
            }
        }
        match tag {
            b'1' => {
                if let Some(Expect::ParseComplete { swallow, .. }) = self.queue.front() {
                    let swallow = *swallow;
                    self.queue.pop_front();
                    return swallow;
                }
            }
            b'2' => self.pop_if(|e| matches!(e, Expect::BindComplete)),
            b'3' => {
                if matches!(self.queue.front(), Some(Expect::Evicted { .. })) {
                    self.queue.pop_front();
                    return true;
                }
                self.pop_if(|e| matches!(e, Expect::CloseComplete));
            }
            b'T' | b'n' => {
                self.pop_if(|e| matches!(e, Expect::DescribeStatement | Expect::DescribePortal));
            }
            b'C' | b'I' | b's' => self.pop_if(|e| matches!(e, Expect::Execute)),
            // CopyInResponse: the server ignores the Syncs sent after the COPY's request,
            // until CopyDone or CopyFail; none of them will be answered.
            b'G' => {
                self.copy_in = true;
                if let Some(request) = self.queue.pop_front() {
                    while matches!(self.queue.front(), Some(Expect::Sync)) {
                        self.queue.pop_front();
                    }
                    self.queue.push_front(request);
                }
            }
            b'E' => {
                self.copy_in = false;
                if matches!(self.queue.front(), Some(Expect::Query)) {
                    return false;
                }
                // The backend skips everything up to the next Sync: those requests get no
                // answer, and Parses among them did not happen.
                while let Some(front) = self.queue.front() {
                    if matches!(front, Expect::Sync) {
                        break;
                    }
                    match self.queue.pop_front() {
                        Some(Expect::ParseComplete {
                            name: Some(name), ..
                        }) => backend.remove(&name),
                        // Skipped, so still prepared there.
                        Some(Expect::Evicted { name }) => backend.touch(&name),
                        _ => {}
                    }
                }
            }
            b'Z' => {
                while let Some(front) = self.queue.pop_front() {
                    if matches!(front, Expect::Sync | Expect::Query) {
                        break;
                    }
                }
            }
            _ => {}
        }
        false
    }

    fn pop_if(&mut self, is: impl Fn(&Expect) -> bool) {
        if self.queue.front().is_some_and(is) {
            self.queue.pop_front();
        }
    }

    /// Nothing in flight.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_limits_count_what_is_kept_and_forgetting_gives_it_back() {
        let mut client = ClientStatements {
            limits: StatementLimits {
                count: 2,
                bytes: 100,
            },
            ..ClientStatements::default()
        };
        let statement = |text: &str| {
            Arc::new(Statement {
                server_name: Arc::from("tg_x"),
                parse_rest: Bytes::copy_from_slice(text.as_bytes()),
            })
        };
        client.keep("a", &statement("SELECT 1")).unwrap();
        // Parsed again under the same name: replaced, not counted twice.
        client.keep("a", &statement("SELECT 2")).unwrap();
        client.keep("b", &statement("SELECT 3")).unwrap();
        assert_eq!(
            client.keep("c", &statement("SELECT 4")),
            Err(LimitExceeded::Statements(2))
        );
        assert!(client.forget("a"));
        assert_eq!(
            client.keep("c", &statement(&"x".repeat(100))),
            Err(LimitExceeded::StatementBytes(100))
        );
        client.keep("c", &statement("SELECT 4")).unwrap();
        client.forget_all();
        assert_eq!(client.bytes, 0);
    }

    #[test]
    fn the_reset_sent_ahead_is_discard_all_as_parse_bind_execute() {
        use postgres_protocol::message::frontend;
        let mut expected = BytesMut::new();
        frontend::parse("", "DISCARD ALL", std::iter::empty(), &mut expected).unwrap();
        frontend::bind(
            "",
            "",
            std::iter::empty(),
            std::iter::empty::<()>(),
            |(), _| Ok(postgres_protocol::IsNull::No),
            std::iter::empty(),
            &mut expected,
        )
        .map_err(|_| "bind")
        .unwrap();
        frontend::execute("", 0, &mut expected).unwrap();
        frontend::flush(&mut expected);
        assert_eq!(RESET_AHEAD, &expected[..]);
    }

    #[test]
    fn messages_after_the_first_sync_wait_for_the_reset_and_its_failure_is_kept() {
        let mut client = ClientStatements::default();
        let mut backend = BackendStatements::default();
        let mut responses = Responses::default();
        responses.reset_sent();
        let mut splice = BytesMut::new();
        let mut ctx = StatementContext {
            client: &mut client,
            backend: &mut backend,
            responses: &mut responses,
        };
        assert_eq!(
            on_client_frame(&mut ctx, &head(b'Q', b"SELECT 1\0"), &mut splice),
            Scan::Continue
        );
        assert_eq!(
            on_client_frame(&mut ctx, &head(b'Q', b"SELECT 2\0"), &mut splice),
            Scan::Hold
        );
        assert_eq!(responses.on_reset_frame(b'1', b""), ResetFrame::Swallow);
        assert_eq!(responses.on_reset_frame(b'2', b""), ResetFrame::Swallow);
        assert_eq!(
            responses.on_reset_frame(b'C', b"DISCARD ALL\0"),
            ResetFrame::Swallow
        );
        assert_eq!(responses.on_reset_frame(b'T', b""), ResetFrame::NotReset);
        assert!(responses.reset_failure().is_none());

        responses.clear();
        responses.reset_sent();
        assert_eq!(
            responses.on_reset_frame(
                b'E',
                b"SERROR\0C57014\0Mcanceling statement due to statement timeout\0\0"
            ),
            ResetFrame::Failed
        );
        assert_eq!(
            responses.reset_failure(),
            Some("57014 canceling statement due to statement timeout")
        );
        assert_eq!(responses.on_reset_frame(b'Z', b"I"), ResetFrame::Failed);
    }

    fn head(tag: u8, body: &[u8]) -> FrameHead<'_> {
        FrameHead {
            tag,
            body_len: body.len(),
            status: 0,
            body,
        }
    }

    #[test]
    fn a_full_cache_closes_its_least_recently_used_statement_between_batches() {
        let mut client = ClientStatements::default();
        let mut backend = BackendStatements::default();
        backend.capacity = 2;
        let mut responses = Responses::default();
        let mut ctx = StatementContext {
            client: &mut client,
            backend: &mut backend,
            responses: &mut responses,
        };
        let mut splice = BytesMut::new();
        for (name, sql) in [("a", "SELECT 1"), ("b", "SELECT 2")] {
            let body = format!("{name}\0{sql}\0\0\0");
            on_client_frame(&mut ctx, &head(b'P', body.as_bytes()), &mut splice);
        }
        // Same batch: nothing may go, the cache grows.
        on_client_frame(&mut ctx, &head(b'P', b"c\0SELECT 3\0\0\0"), &mut splice);
        assert_eq!(ctx.backend.len(), 3);
        assert!(
            !ctx.responses
                .queue
                .iter()
                .any(|e| matches!(e, Expect::Evicted { .. }))
        );
        on_client_frame(&mut ctx, &head(b'S', b""), &mut splice);
        // Next batch: using `a` makes `b` the least recently used; a new one closes it.
        splice.clear();
        on_client_frame(&mut ctx, &head(b'B', b"\0a\0\0\0\0\0\0\0"), &mut splice);
        splice.clear();
        on_client_frame(&mut ctx, &head(b'P', b"d\0SELECT 4\0\0\0"), &mut splice);
        let server_b = server_name(b"SELECT 2\0\0\0");
        let mut close = vec![b'C'];
        close.extend_from_slice(
            &u32::try_from(4 + 1 + server_b.len() + 1)
                .unwrap_or(0)
                .to_be_bytes(),
        );
        close.push(b'S');
        close.extend_from_slice(server_b.as_bytes());
        close.push(0);
        assert!(splice.starts_with(&close), "{splice:?}");
        assert!(!ctx.backend.contains(&server_b));
        assert_eq!(ctx.backend.len(), 3);
        // The backend's CloseComplete for it is swallowed.
        let mut statements = BackendStatements::default();
        responses.queue.clear();
        responses.queue.push_back(Expect::Evicted {
            name: Arc::clone(&server_b),
        });
        assert!(responses.on_backend_frame(b'3', &[], &mut statements));
    }

    #[test]
    fn parse_is_renamed_and_prepared_again_on_a_backend_that_has_it() {
        let mut client = ClientStatements::default();
        let mut backend = BackendStatements::default();
        let mut responses = Responses::default();
        let mut splice = BytesMut::new();
        let body = b"s0\0SELECT 1\0\0\0";
        let mut ctx = StatementContext {
            client: &mut client,
            backend: &mut backend,
            responses: &mut responses,
        };
        let scan = on_client_frame(&mut ctx, &head(b'P', body), &mut splice);
        assert_eq!(
            scan,
            Scan::Splice {
                consume: 5 + body.len()
            }
        );
        assert!(splice.starts_with(b"P"));
        assert!(splice.windows(3).any(|w| w == b"tg_"));
        assert_eq!(backend.len(), 1);

        // A second client preparing the same text on this backend: it is closed and prepared
        // again there (issue 11: a DDL since may have changed what it means), and the second
        // client sees only its own ParseComplete.
        let mut other = ClientStatements::default();
        splice.clear();
        let mut ctx = StatementContext {
            client: &mut other,
            backend: &mut backend,
            responses: &mut responses,
        };
        let body = b"other\0SELECT 1\0\0\0";
        on_client_frame(&mut ctx, &head(b'P', body), &mut splice);
        assert!(splice.starts_with(b"C"), "{splice:?}");
        assert!(splice.windows(2).any(|w| w == b"\0P"), "{splice:?}");
        assert_eq!(backend.len(), 1);
        // The first client's ParseComplete, then the Close's (swallowed), then the second's.
        assert!(!responses.on_backend_frame(b'1', &[], &mut backend));
        assert!(responses.on_backend_frame(b'3', &[], &mut backend));
        assert!(!responses.on_backend_frame(b'1', &[], &mut backend));
        assert!(!responses.injection_due());
    }

    #[test]
    fn bind_on_a_fresh_backend_prepares_first_and_hides_the_parse_complete() {
        let mut client = ClientStatements::default();
        let mut first = BackendStatements::default();
        let mut responses = Responses::default();
        let mut splice = BytesMut::new();
        let mut ctx = StatementContext {
            client: &mut client,
            backend: &mut first,
            responses: &mut responses,
        };
        on_client_frame(
            &mut ctx,
            &head(b'P', b"s0\0SELECT $1\0\0\x01\0\0\0\x17"),
            &mut splice,
        );
        responses.on_backend_frame(b'1', &[], &mut first);

        let mut second = BackendStatements::default();
        splice.clear();
        let bind = b"\0s0\0\0\0\0\x01\0\0\0\x011\0\0";
        let mut ctx = StatementContext {
            client: &mut client,
            backend: &mut second,
            responses: &mut responses,
        };
        let scan = on_client_frame(&mut ctx, &head(b'B', bind), &mut splice);
        assert_eq!(scan, Scan::Splice { consume: 5 + 4 });
        assert!(splice.starts_with(b"P"));
        assert!(second.len() == 1);
        // Its ParseComplete is swallowed, the BindComplete passes.
        assert!(responses.on_backend_frame(b'1', &[], &mut second));
        assert!(!responses.on_backend_frame(b'2', &[], &mut second));
    }

    #[test]
    fn deallocate_forms() {
        let p = |t: &str| parse_deallocate(format!("{t}\0").as_bytes());
        assert_eq!(p("DEALLOCATE s0"), Some(Deallocate::Name("s0".into())));
        assert_eq!(
            p(" deallocate prepare S1 ; "),
            Some(Deallocate::Name("s1".into()))
        );
        assert_eq!(
            p("DEALLOCATE \"_pg3_0\""),
            Some(Deallocate::Name("_pg3_0".into()))
        );
        assert_eq!(p("DEALLOCATE ALL"), Some(Deallocate::All));
        assert_eq!(p("DEALLOCATE a b"), None);
        assert_eq!(p("SELECT 1"), None);
    }

    #[test]
    fn a_deallocate_not_all_here_is_waited_for_and_other_queries_are_not() {
        let mut client = ClientStatements::default();
        let mut backend = BackendStatements::default();
        let mut responses = Responses::default();
        let mut ctx = StatementContext {
            client: &mut client,
            backend: &mut backend,
            responses: &mut responses,
        };
        let text = b" DEALLOCATE s0\0";
        for cut in 0..text.len() {
            let partial = FrameHead {
                tag: b'Q',
                body_len: text.len(),
                status: 0,
                body: &text[..cut],
            };
            assert_eq!(on_query(&mut ctx, &partial), Scan::Hold, "cut at {cut}");
        }
        let select = b"SELECT 1\0";
        let partial = FrameHead {
            tag: b'Q',
            body_len: select.len(),
            status: 0,
            body: &select[..3],
        };
        assert_eq!(on_query(&mut ctx, &partial), Scan::Continue);
        // Too large to ever be all in the buffer: it goes on (the backend answers it).
        let partial = FrameHead {
            tag: b'Q',
            body_len: 20_000,
            status: 0,
            body: b"DEALLOCATE ",
        };
        assert_eq!(on_query(&mut ctx, &partial), Scan::Continue);
    }

    #[test]
    fn an_error_forgets_parses_that_did_not_happen() {
        let mut client = ClientStatements::default();
        let mut backend = BackendStatements::default();
        let mut responses = Responses::default();
        let mut splice = BytesMut::new();
        let mut ctx = StatementContext {
            client: &mut client,
            backend: &mut backend,
            responses: &mut responses,
        };
        on_client_frame(&mut ctx, &head(b'P', b"bad\0SELEC oops\0\0\0"), &mut splice);
        on_client_frame(&mut ctx, &head(b'S', b""), &mut splice);
        assert_eq!(backend.len(), 1);
        responses.on_backend_frame(b'E', &[], &mut backend);
        assert!(backend.is_empty());
        responses.on_backend_frame(b'Z', &[], &mut backend);
        assert!(responses.is_empty());
    }
}
