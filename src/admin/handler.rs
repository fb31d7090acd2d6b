//! pgwire glue: the simple and extended query handlers of the admin console. Statements are
//! parsed by `command`, run by `exec`, and their results turned into RowDescription/DataRow
//! with typed columns in the format each portal asks for. Errors become ErrorResponses with
//! the SQLSTATE `AdminError` maps them to. Nothing here knows a command's meaning.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::{Sink, stream};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;

use super::AdminContext;
use super::command::{self, Command};
use super::error::AdminError;
use super::exec::{self, Outcome, Progress};
use super::table::{ColumnType, Table, Value};
use crate::error::{ClientFacing, log_error};
use crate::stats::ProcessCounters;

/// A parsed statement of the extended protocol: one command and its text.
#[derive(Debug, Clone)]
pub(super) struct AdminStatement {
    sql: String,
    command: Arc<Command>,
}

/// Parses Parse messages into [`AdminStatement`]s and describes them.
#[derive(Debug)]
pub(super) struct AdminParser {
    /// Counts a statement that does not parse as a failed command.
    process: Arc<ProcessCounters>,
}

#[async_trait]
impl QueryParser for AdminParser {
    type Statement = AdminStatement;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<AdminStatement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut commands = command::parse(sql).map_err(|e| {
            self.process.admin_command(false);
            user_error(&e)
        })?;
        if commands.len() > 1 {
            return Err(user_error(&AdminError::Syntax(
                "cannot insert multiple commands into a prepared statement".to_owned(),
            )));
        }
        let command = commands.pop().unwrap_or(Command::Empty);
        Ok(Some(AdminStatement {
            sql: sql.to_owned(),
            command: Arc::new(command),
        }))
    }

    fn get_parameter_types(&self, stmt: &AdminStatement) -> PgWireResult<Vec<Type>> {
        Ok(vec![Type::TEXT; command::parameter_count(&stmt.sql)])
    }

    fn get_result_schema(
        &self,
        stmt: &AdminStatement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let columns = exec::result_columns(&stmt.command).map_err(|e| user_error(&e))?;
        let table = Table::new(columns);
        Ok(fields(&table, column_format))
    }
}

/// The console's handlers for one admin connection.
pub(super) struct AdminHandler {
    ctx: Arc<AdminContext>,
    parser: Arc<AdminParser>,
    /// The admin user, recorded as the actor in the activity log.
    user: String,
}

impl AdminHandler {
    pub(super) fn new(ctx: Arc<AdminContext>, user: &str) -> AdminHandler {
        AdminHandler {
            parser: Arc::new(AdminParser {
                process: Arc::clone(ctx.stats.process()),
            }),
            ctx,
            user: user.to_owned(),
        }
    }

    /// Runs one command, sending progress NOTICEs as they come; returns its response.
    async fn run<C>(
        &self,
        client: &mut C,
        command: &Command,
        params: &[Option<String>],
        format: Option<&Format>,
    ) -> PgWireResult<Response>
    where
        C: Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<C::Error>,
    {
        let (progress, mut notices) = tokio::sync::mpsc::unbounded_channel();
        let progress = Progress::new(progress);
        let work = exec::execute(&self.ctx, &self.user, command, params, &progress);
        tokio::pin!(work);
        let result = loop {
            tokio::select! {
                result = &mut work => break result,
                Some(text) = notices.recv() => {
                    futures_util::SinkExt::send(client, notice(&text)).await?;
                }
            }
        };
        // Notices sent just before the end.
        while let Ok(text) = notices.try_recv() {
            futures_util::SinkExt::send(client, notice(&text)).await?;
        }
        self.ctx.stats.process().admin_command(result.is_ok());
        // The audit line: kind and tenant only, never the arguments (passwords).
        let (outcome, reason) = match &result {
            Ok(_) => ("ok", ""),
            // The SQLSTATE only: messages may quote arguments; log_error has the detail.
            Err(e) => ("error", e.sqlstate().code()),
        };
        tracing::info!(
            target: "tenantgate::audit",
            event = "admin command",
            admin_user = %self.user,
            command = command.kind(),
            tenant = command.tenant(params).as_deref().unwrap_or(""),
            outcome,
            reason,
            "admin command"
        );
        match result {
            Ok(Outcome::Rows(table)) => Ok(Response::Query(query_response(&table, format)?)),
            Ok(Outcome::Done(tag)) => Ok(Response::Execution(Tag::new(tag))),
            Ok(Outcome::Empty) => Ok(Response::EmptyQuery),
            Err(e) => {
                log_error(&e, "admin command failed");
                Ok(Response::Error(Box::new(error_info(&e))))
            }
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for AdminHandler {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let commands = match command::parse(query) {
            Ok(commands) => commands,
            Err(e) => {
                self.ctx.stats.process().admin_command(false);
                return Ok(vec![Response::Error(Box::new(error_info(&e)))]);
            }
        };
        let mut responses = Vec::with_capacity(commands.len());
        for command in &commands {
            let response = self.run(client, command, &[], None).await?;
            let failed = matches!(response, Response::Error(_));
            responses.push(response);
            if failed {
                // Like PostgreSQL: the rest of a multi-statement query is skipped.
                break;
            }
        }
        Ok(responses)
    }
}

#[async_trait]
impl ExtendedQueryHandler for AdminHandler {
    type Statement = AdminStatement;
    type QueryParser = AdminParser;

    fn query_parser(&self) -> Arc<AdminParser> {
        Arc::clone(&self.parser)
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<AdminStatement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = AdminStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let params = parameters(portal).map_err(|e| user_error(&e))?;
        let command = Arc::clone(&portal.statement.statement.command);
        let response = self
            .run(
                client,
                &command,
                &params,
                Some(&portal.result_column_format),
            )
            .await?;
        match response {
            // The extended protocol has no room for an error among results: raise it.
            Response::Error(info) => Err(PgWireError::UserError(info)),
            other => Ok(other),
        }
    }
}

/// Bound parameters as text: text-format values as sent, binary integers and booleans
/// decoded, anything else read as UTF-8.
fn parameters(portal: &Portal<AdminStatement>) -> Result<Vec<Option<String>>, AdminError> {
    let types = &portal.statement.parameter_types;
    portal
        .parameters
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let Some(bytes) = value else {
                return Ok(None);
            };
            let bad = || AdminError::BadValue(format!("parameter ${} cannot be read", i + 1));
            if portal.parameter_format.is_binary(i) {
                let ty = types.get(i).cloned().flatten();
                let text = match (ty, bytes.len()) {
                    (Some(t), 2) if t == Type::INT2 => {
                        i16::from_be_bytes([bytes[0], bytes[1]]).to_string()
                    }
                    (Some(t), 4) if t == Type::INT4 => {
                        i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]).to_string()
                    }
                    (Some(t), 8) if t == Type::INT8 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(bytes);
                        i64::from_be_bytes(b).to_string()
                    }
                    (Some(t), 1) if t == Type::BOOL => (bytes[0] != 0).to_string(),
                    _ => String::from_utf8(bytes.to_vec()).map_err(|_| bad())?,
                };
                Ok(Some(text))
            } else {
                String::from_utf8(bytes.to_vec())
                    .map(Some)
                    .map_err(|_| bad())
            }
        })
        .collect()
}

fn pg_type(ty: ColumnType) -> Type {
    match ty {
        ColumnType::Int8 => Type::INT8,
        ColumnType::Float8 => Type::FLOAT8,
        ColumnType::Text => Type::TEXT,
        ColumnType::Bool => Type::BOOL,
        ColumnType::Timestamptz => Type::TIMESTAMPTZ,
    }
}

fn fields(table: &Table, format: Option<&Format>) -> Vec<FieldInfo> {
    table
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let f = format.map_or(FieldFormat::Text, |f| f.format_for(i));
            FieldInfo::new(c.name.clone(), None, None, pg_type(c.ty), f)
        })
        .collect()
}

fn query_response(table: &Table, format: Option<&Format>) -> PgWireResult<QueryResponse> {
    let schema = Arc::new(fields(table, format));
    let mut rows = Vec::with_capacity(table.rows.len());
    let mut encoder = DataRowEncoder::new(Arc::clone(&schema));
    for row in &table.rows {
        for value in row {
            match value {
                Value::Null => encoder.encode_field(&None::<String>)?,
                Value::Int(n) => encoder.encode_field(n)?,
                Value::Float(x) => encoder.encode_field(x)?,
                Value::Text(s) => encoder.encode_field(s)?,
                Value::Bool(b) => encoder.encode_field(b)?,
                Value::Time(t) => encoder.encode_field(t)?,
            }
        }
        rows.push(Ok(encoder.take_row()));
    }
    Ok(QueryResponse::new(schema, stream::iter(rows)))
}

fn error_info(e: &AdminError) -> ErrorInfo {
    let mut info = ErrorInfo::new(
        "ERROR".to_owned(),
        e.sqlstate().code().to_owned(),
        e.client_message(),
    );
    info.hint = e.hint().map(str::to_owned);
    info
}

fn user_error(e: &AdminError) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(e)))
}

fn notice(text: &str) -> PgWireBackendMessage {
    PgWireBackendMessage::NoticeResponse(
        ErrorInfo::new("NOTICE".to_owned(), "00000".to_owned(), text.to_owned()).into(),
    )
}
