//! The admin console's language: statements split and tokenized by sqlparser, SELECT parsed
//! by sqlparser into its AST, and tenantgate's own commands (SHOW, CREATE TENANT, MIGRATE,
//! SUSPEND...) matched over sqlparser's tokens, so quoting, comments and `$n` parameters behave
//! as in PostgreSQL. This module only parses; it runs nothing.

use sqlparser::ast::{Query, Statement};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer, Word};

use super::error::AdminError;
use crate::provision::DatabaseOnDrop;

/// A value in a command: written inline, or a `$n` parameter bound at execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Arg {
    Literal(String),
    Param(usize),
}

impl Arg {
    /// The value, with parameters taken from `params` (1-based).
    pub(super) fn resolve(&self, params: &[Option<String>]) -> Result<String, AdminError> {
        match self {
            Arg::Literal(s) => Ok(s.clone()),
            Arg::Param(n) => match params.get(n - 1) {
                Some(Some(v)) => Ok(v.clone()),
                Some(None) => Err(AdminError::BadValue(format!("parameter ${n} is null"))),
                None => Err(AdminError::MissingParameter(*n)),
            },
        }
    }
}

/// What SHOW shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ShowWhat {
    Help,
    Tenants,
    Pools,
    Clients,
    Servers,
    Stats,
    Config,
    Version,
    Activity,
    Migrations,
    Domains,
    Plans,
    Instances,
}

/// One admin statement.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Command {
    /// Nothing to do (an empty statement).
    Empty,
    /// SET, BEGIN, COMMIT... from tools that send them on connect: accepted, no effect.
    Ignored(&'static str),
    Show {
        what: ShowWhat,
        tenant: Option<Arg>,
    },
    Select(Box<Query>),
    CreateTenant {
        slug: Arg,
        name: Option<Arg>,
        plan: Option<Arg>,
        server: Option<Arg>,
    },
    RegisterTenant {
        slug: Arg,
        database: Arg,
        role: Arg,
        password: Arg,
        server: Option<Arg>,
    },
    /// CREATE USER (`replace` false) and ALTER USER (`replace` true): a password, an auth
    /// method (`scram`, `cert`, `cert+scram`), or both.
    SetUser {
        user: Arg,
        tenant: Arg,
        password: Option<Arg>,
        auth: Option<Arg>,
        replace: bool,
    },
    /// CREATE ADMIN USER and ALTER ADMIN USER, as SetUser.
    SetAdminUser {
        user: Arg,
        password: Option<Arg>,
        auth: Option<Arg>,
        replace: bool,
    },
    /// ALTER TENANT slug ADD DOMAIN 'd' (`add`) / DROP DOMAIN 'd'.
    TenantDomain {
        slug: Arg,
        domain: Arg,
        add: bool,
    },
    /// ALTER TENANT slug SET PLAN 'name'.
    SetPlan {
        slug: Arg,
        plan: Arg,
    },
    /// ALTER TENANT slug SET (key = value, ...): the tenant's own values of single plan
    /// settings. Keys are lower-cased as written; `exec` checks them.
    SetOverrides {
        slug: Arg,
        values: Vec<(String, Arg)>,
    },
    /// ALTER TENANT slug RESET (key, ...), or RESET ALL (`keys` is `None`).
    ResetOverrides {
        slug: Arg,
        keys: Option<Vec<String>>,
    },
    DropUser {
        user: Arg,
        tenant: Arg,
    },
    SuspendTenant {
        slug: Arg,
        force: bool,
    },
    ResumeTenant {
        slug: Arg,
    },
    DropTenant {
        slug: Arg,
        on_drop: DatabaseOnDrop,
    },
    MigrateTenant {
        slug: Arg,
    },
    MigrateAll {
        concurrency: Option<Arg>,
    },
    Kill {
        slug: Arg,
    },
    /// PAUSE [slug]: hold new transactions, let running ones finish.
    Pause {
        slug: Option<Arg>,
    },
    /// RESUME [slug] (without TENANT): undo PAUSE.
    Unpause {
        slug: Option<Arg>,
    },
    /// RELOAD: re-read the config file.
    Reload,
    /// ROTATE MASTER KEY: a new master key in the key file, every stored secret re-encrypted.
    RotateMasterKey,
    /// RETIRE OLD MASTER KEYS: drop all but the current key from the key file.
    RetireMasterKeys,
}

impl Command {
    /// The command's kind for the audit log: never its arguments (some are passwords).
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Command::Empty => "empty",
            Command::Ignored(_) => "ignored",
            Command::Show { .. } => "show",
            Command::Select(_) => "select",
            Command::CreateTenant { .. } => "create tenant",
            Command::RegisterTenant { .. } => "register tenant",
            Command::SetUser { replace: false, .. } => "create user",
            Command::SetUser { replace: true, .. } => "alter user",
            Command::DropUser { .. } => "drop user",
            Command::SetAdminUser { replace: false, .. } => "create admin user",
            Command::SetAdminUser { replace: true, .. } => "alter admin user",
            Command::TenantDomain { add: true, .. } => "add domain",
            Command::TenantDomain { add: false, .. } => "drop domain",
            Command::SetPlan { .. } => "set plan",
            Command::SetOverrides { .. } => "set overrides",
            Command::ResetOverrides { .. } => "reset overrides",
            Command::SuspendTenant { .. } => "suspend tenant",
            Command::ResumeTenant { .. } => "resume tenant",
            Command::DropTenant { .. } => "drop tenant",
            Command::MigrateTenant { .. } => "migrate tenant",
            Command::MigrateAll { .. } => "migrate all",
            Command::Kill { .. } => "kill",
            Command::Pause { .. } => "pause",
            Command::Unpause { .. } => "resume",
            Command::Reload => "reload",
            Command::RotateMasterKey => "rotate master key",
            Command::RetireMasterKeys => "retire old master keys",
        }
    }

    /// The tenant a command is about, if any (its slug as given, parameters resolved).
    pub(super) fn tenant(&self, params: &[Option<String>]) -> Option<String> {
        let arg = match self {
            Command::Show { tenant, .. } => tenant.as_ref(),
            Command::CreateTenant { slug, .. }
            | Command::RegisterTenant { slug, .. }
            | Command::SuspendTenant { slug, .. }
            | Command::ResumeTenant { slug }
            | Command::DropTenant { slug, .. }
            | Command::MigrateTenant { slug }
            | Command::TenantDomain { slug, .. }
            | Command::SetPlan { slug, .. }
            | Command::SetOverrides { slug, .. }
            | Command::ResetOverrides { slug, .. }
            | Command::Kill { slug } => Some(slug),
            Command::SetUser { tenant, .. } | Command::DropUser { tenant, .. } => Some(tenant),
            Command::Pause { slug } | Command::Unpause { slug } => slug.as_ref(),
            Command::Empty
            | Command::Ignored(_)
            | Command::Select(_)
            | Command::MigrateAll { .. }
            | Command::SetAdminUser { .. }
            | Command::Reload
            | Command::RotateMasterKey
            | Command::RetireMasterKeys => None,
        };
        arg.and_then(|a| a.resolve(params).ok())
    }
}

/// How many `$n` parameters a statement takes (the highest n). Counting over the tokens
/// covers SELECT too, whose parameters live in its AST.
pub(super) fn parameter_count(sql: &str) -> usize {
    tokens(sql).map_or(0, |tokens| {
        tokens
            .iter()
            .filter_map(|t| match t {
                Token::Placeholder(p) => p.strip_prefix('$')?.parse::<usize>().ok(),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    })
}

/// Parses a query string into its statements.
pub(super) fn parse(sql: &str) -> Result<Vec<Command>, AdminError> {
    let tokens = tokens(sql)?;
    let mut commands = Vec::new();
    for statement in tokens.split(|t| matches!(t, Token::SemiColon)) {
        if statement.is_empty() {
            continue;
        }
        commands.push(parse_statement(statement)?);
    }
    if commands.is_empty() {
        commands.push(Command::Empty);
    }
    Ok(commands)
}

/// The tokens of `sql` without whitespace and comments.
fn tokens(sql: &str) -> Result<Vec<Token>, AdminError> {
    let dialect = PostgreSqlDialect {};
    let all = Tokenizer::new(&dialect, sql)
        .tokenize()
        .map_err(|e| AdminError::Syntax(e.to_string()))?;
    Ok(all
        .into_iter()
        .filter(|t| !matches!(t, Token::Whitespace(_) | Token::EOF))
        .collect())
}

fn parse_statement(tokens: &[Token]) -> Result<Command, AdminError> {
    let mut c = Cursor { tokens, pos: 0 };
    let first = c.peek_keyword().unwrap_or_default();
    match first.as_str() {
        "SELECT" | "WITH" | "TABLE" | "VALUES" => parse_select(tokens),
        "SHOW" => {
            c.pos += 1;
            parse_show(&mut c)
        }
        "CREATE" => {
            c.pos += 1;
            if c.eat("TENANT") {
                parse_create_tenant(&mut c)
            } else if c.eat("USER") {
                parse_set_user(&mut c, false)
            } else if c.eat("ADMIN") {
                c.expect("USER")?;
                parse_set_admin_user(&mut c, false)
            } else {
                Err(unsupported(tokens))
            }
        }
        "ALTER" => {
            c.pos += 1;
            if c.eat("TENANT") {
                parse_alter_tenant(&mut c)
            } else if c.eat("ADMIN") {
                c.expect("USER")?;
                parse_set_admin_user(&mut c, true)
            } else {
                c.expect("USER")?;
                parse_set_user(&mut c, true)
            }
        }
        "REGISTER" => {
            c.pos += 1;
            c.expect("TENANT")?;
            parse_register(&mut c)
        }
        "DROP" => {
            c.pos += 1;
            parse_drop(&mut c, tokens)
        }
        "SUSPEND" => {
            c.pos += 1;
            c.expect("TENANT")?;
            let slug = c.arg("tenant slug")?;
            let force = c.eat("FORCE");
            c.end(Command::SuspendTenant { slug, force })
        }
        "RESUME" => {
            c.pos += 1;
            if c.eat("TENANT") {
                let slug = c.arg("tenant slug")?;
                c.end(Command::ResumeTenant { slug })
            } else {
                let slug = c.opt_arg("tenant slug")?;
                c.end(Command::Unpause { slug })
            }
        }
        "PAUSE" => {
            c.pos += 1;
            let slug = c.opt_arg("tenant slug")?;
            c.end(Command::Pause { slug })
        }
        "MIGRATE" => {
            c.pos += 1;
            parse_migrate(&mut c)
        }
        "KILL" => {
            c.pos += 1;
            let slug = c.arg("tenant slug")?;
            c.end(Command::Kill { slug })
        }
        "RELOAD" => {
            c.pos += 1;
            c.end(Command::Reload)
        }
        "ROTATE" => {
            c.pos += 1;
            c.expect("MASTER")?;
            c.expect("KEY")?;
            c.end(Command::RotateMasterKey)
        }
        "RETIRE" => {
            c.pos += 1;
            c.expect("OLD")?;
            c.expect("MASTER")?;
            c.expect("KEYS")?;
            c.end(Command::RetireMasterKeys)
        }
        "SET" | "RESET" => Ok(Command::Ignored("SET")),
        "BEGIN" | "START" => Ok(Command::Ignored("BEGIN")),
        "COMMIT" | "END" => Ok(Command::Ignored("COMMIT")),
        "ROLLBACK" | "ABORT" => Ok(Command::Ignored("ROLLBACK")),
        "DISCARD" => Ok(Command::Ignored("DISCARD ALL")),
        _ => Err(unsupported(tokens)),
    }
}

fn parse_drop(c: &mut Cursor<'_>, tokens: &[Token]) -> Result<Command, AdminError> {
    if c.eat("TENANT") {
        let slug = c.arg("tenant slug")?;
        let on_drop = if c.eat("KEEP") {
            c.expect("DATABASE")?;
            DatabaseOnDrop::Keep
        } else if c.eat("DROP") {
            c.expect("DATABASE")?;
            DatabaseOnDrop::Drop
        } else {
            DatabaseOnDrop::ByOrigin
        };
        c.end(Command::DropTenant { slug, on_drop })
    } else if c.eat("USER") {
        let user = c.arg("user name")?;
        c.expect("FOR")?;
        c.expect("TENANT")?;
        let tenant = c.arg("tenant slug")?;
        c.end(Command::DropUser { user, tenant })
    } else {
        Err(unsupported(tokens))
    }
}

fn parse_migrate(c: &mut Cursor<'_>) -> Result<Command, AdminError> {
    if c.eat("ALL") {
        c.expect("TENANTS")?;
        let concurrency = if c.eat("CONCURRENCY") {
            Some(c.arg("concurrency")?)
        } else {
            None
        };
        c.end(Command::MigrateAll { concurrency })
    } else {
        c.expect("TENANT")?;
        let slug = c.arg("tenant slug")?;
        c.end(Command::MigrateTenant { slug })
    }
}

fn unsupported(tokens: &[Token]) -> AdminError {
    let words: Vec<String> = tokens.iter().take(3).map(ToString::to_string).collect();
    AdminError::Unsupported(words.join(" "))
}

fn parse_select(tokens: &[Token]) -> Result<Command, AdminError> {
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect).with_tokens(tokens.to_vec());
    let statement = parser
        .parse_statement()
        .map_err(|e| AdminError::Syntax(e.to_string()))?;
    match statement {
        Statement::Query(query) => Ok(Command::Select(query)),
        _ => Err(AdminError::Unsupported(
            "only SELECT reads the console's tables".to_owned(),
        )),
    }
}

fn parse_show(c: &mut Cursor<'_>) -> Result<Command, AdminError> {
    let word = c
        .next_keyword()
        .ok_or_else(|| AdminError::Syntax("SHOW what? Try SHOW HELP".to_owned()))?;
    let what = match word.as_str() {
        "HELP" => ShowWhat::Help,
        "TENANTS" | "TENANT" => ShowWhat::Tenants,
        "POOLS" => ShowWhat::Pools,
        "CLIENTS" => ShowWhat::Clients,
        "SERVERS" => ShowWhat::Servers,
        "STATS" => ShowWhat::Stats,
        "CONFIG" => ShowWhat::Config,
        "VERSION" => ShowWhat::Version,
        "ACTIVITY" => ShowWhat::Activity,
        "MIGRATIONS" => ShowWhat::Migrations,
        "DOMAINS" => ShowWhat::Domains,
        "PLANS" => ShowWhat::Plans,
        "INSTANCES" => ShowWhat::Instances,
        other => {
            return Err(AdminError::Unsupported(format!("SHOW {other}")));
        }
    };
    let takes_tenant = matches!(
        what,
        ShowWhat::Tenants
            | ShowWhat::Pools
            | ShowWhat::Clients
            | ShowWhat::Stats
            | ShowWhat::Activity
            | ShowWhat::Migrations
            | ShowWhat::Domains
    );
    let tenant = if takes_tenant && !c.at_end() {
        Some(c.arg("tenant slug")?)
    } else {
        None
    };
    if word == "TENANT" && tenant.is_none() {
        return Err(AdminError::Syntax("SHOW TENANT needs a slug".to_owned()));
    }
    c.end(Command::Show { what, tenant })
}

fn parse_create_tenant(c: &mut Cursor<'_>) -> Result<Command, AdminError> {
    let slug = c.arg("tenant slug")?;
    let (mut name, mut plan, mut server) = (None, None, None);
    if c.eat("WITH") {
        c.expect_token(&Token::LParen, "(")?;
        loop {
            let key = c
                .next_keyword()
                .ok_or_else(|| AdminError::Syntax("expected an option name".to_owned()))?;
            if !c.eat_token(&Token::Eq) {
                // `WITH (plan 'x')` reads as well as `WITH (plan = 'x')`.
            }
            let value = c.arg(&key.to_lowercase())?;
            match key.as_str() {
                "NAME" => name = Some(value),
                "PLAN" => plan = Some(value),
                "SERVER" => server = Some(value),
                other => {
                    return Err(AdminError::Syntax(format!(
                        "unknown option {}: CREATE TENANT takes name, plan and server",
                        other.to_lowercase()
                    )));
                }
            }
            if c.eat_token(&Token::RParen) {
                break;
            }
            c.expect_token(&Token::Comma, ", or )")?;
        }
    }
    c.end(Command::CreateTenant {
        slug,
        name,
        plan,
        server,
    })
}

fn parse_register(c: &mut Cursor<'_>) -> Result<Command, AdminError> {
    let slug = c.arg("tenant slug")?;
    let (mut database, mut role, mut password, mut server) = (None, None, None, None);
    while !c.at_end() {
        let key = c.next_keyword().ok_or_else(|| {
            AdminError::Syntax("expected DATABASE, ROLE, PASSWORD or SERVER".to_owned())
        })?;
        let value = c.arg(&key.to_lowercase())?;
        match key.as_str() {
            "DATABASE" => database = Some(value),
            "ROLE" | "USER" => role = Some(value),
            "PASSWORD" => password = Some(value),
            "SERVER" => server = Some(value),
            other => {
                return Err(AdminError::Syntax(format!(
                    "unknown option {other}: REGISTER TENANT takes DATABASE, ROLE, PASSWORD and SERVER"
                )));
            }
        }
    }
    let missing = |what: &str| AdminError::Syntax(format!("REGISTER TENANT needs {what}"));
    Ok(Command::RegisterTenant {
        slug,
        database: database.ok_or_else(|| missing("DATABASE 'name'"))?,
        role: role.ok_or_else(|| missing("ROLE 'name'"))?,
        password: password.ok_or_else(|| missing("PASSWORD 'secret'"))?,
        server,
    })
}

fn parse_set_user(c: &mut Cursor<'_>, replace: bool) -> Result<Command, AdminError> {
    let user = c.arg("user name")?;
    c.expect("FOR")?;
    c.expect("TENANT")?;
    let tenant = c.arg("tenant slug")?;
    let (password, auth) = parse_user_options(c)?;
    c.end(Command::SetUser {
        user,
        tenant,
        password,
        auth,
        replace,
    })
}

fn parse_set_admin_user(c: &mut Cursor<'_>, replace: bool) -> Result<Command, AdminError> {
    let user = c.arg("user name")?;
    let (password, auth) = parse_user_options(c)?;
    c.end(Command::SetAdminUser {
        user,
        password,
        auth,
        replace,
    })
}

/// `[WITH] [PASSWORD 'pw'] [AUTH scram|cert|cert+scram]`, at least one of the two.
fn parse_user_options(c: &mut Cursor<'_>) -> Result<(Option<Arg>, Option<Arg>), AdminError> {
    c.eat("WITH");
    let (mut password, mut auth) = (None, None);
    loop {
        if password.is_none() && c.eat("PASSWORD") {
            password = Some(c.arg("password")?);
        } else if auth.is_none() && c.eat("AUTH") {
            auth = Some(c.auth_method()?);
        } else {
            break;
        }
    }
    if password.is_none() && auth.is_none() {
        return Err(c.syntax("PASSWORD 'password' or AUTH scram|cert|cert+scram"));
    }
    Ok((password, auth))
}

/// ALTER TENANT slug ADD DOMAIN 'name' | DROP DOMAIN 'name' | SET PLAN 'name' |
/// SET (key = value, ...) | RESET (key, ...) | RESET ALL.
fn parse_alter_tenant(c: &mut Cursor<'_>) -> Result<Command, AdminError> {
    let slug = c.arg("tenant slug")?;
    let add = if c.eat("ADD") {
        true
    } else if c.eat("DROP") {
        false
    } else if c.eat("SET") {
        return parse_tenant_set(c, slug);
    } else if c.eat("RESET") {
        return parse_tenant_reset(c, slug);
    } else {
        return Err(c.syntax("ADD DOMAIN, DROP DOMAIN, SET PLAN, SET (...) or RESET (...)"));
    };
    c.expect("DOMAIN")?;
    let domain = c.arg("domain")?;
    c.end(Command::TenantDomain { slug, domain, add })
}

/// After ALTER TENANT slug SET: `PLAN 'name'` or `(key = value, ...)`.
fn parse_tenant_set(c: &mut Cursor<'_>, slug: Arg) -> Result<Command, AdminError> {
    if c.eat("PLAN") {
        c.eat_token(&Token::Eq);
        let plan = c.arg("plan name")?;
        return c.end(Command::SetPlan { slug, plan });
    }
    c.expect_token(&Token::LParen, "PLAN or (")?;
    let mut values = Vec::new();
    loop {
        let key = c.key()?;
        // `SET (pool_size 8)` reads as well as `SET (pool_size = 8)`, as in CREATE TENANT.
        c.eat_token(&Token::Eq);
        let value = c.value(&key)?;
        values.push((key, value));
        if c.eat_token(&Token::RParen) {
            break;
        }
        c.expect_token(&Token::Comma, ", or )")?;
    }
    c.end(Command::SetOverrides { slug, values })
}

/// After ALTER TENANT slug RESET: `(key, ...)` or `ALL`.
fn parse_tenant_reset(c: &mut Cursor<'_>, slug: Arg) -> Result<Command, AdminError> {
    if c.eat("ALL") {
        return c.end(Command::ResetOverrides { slug, keys: None });
    }
    c.expect_token(&Token::LParen, "ALL or (")?;
    let mut keys = Vec::new();
    loop {
        keys.push(c.key()?);
        if c.eat_token(&Token::RParen) {
            break;
        }
        c.expect_token(&Token::Comma, ", or )")?;
    }
    c.end(Command::ResetOverrides {
        slug,
        keys: Some(keys),
    })
}

/// An unquoted word or a number.
fn is_bare(token: &Token) -> bool {
    matches!(
        token,
        Token::Word(Word {
            quote_style: None,
            ..
        }) | Token::Number(..)
    )
}

fn bare_text(token: &Token) -> String {
    match token {
        Token::Word(w) => w.value.to_lowercase(),
        other => other.to_string(),
    }
}

struct Cursor<'a> {
    tokens: &'a [Token],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn at_end(&self) -> bool {
        self.pos >= self.tokens.len()
    }

    /// The next token as an uppercase keyword, if it is an unquoted word.
    fn peek_keyword(&self) -> Option<String> {
        match self.peek() {
            Some(Token::Word(Word {
                value,
                quote_style: None,
                ..
            })) => Some(value.to_ascii_uppercase()),
            _ => None,
        }
    }

    fn next_keyword(&mut self) -> Option<String> {
        let word = self.peek_keyword()?;
        self.pos += 1;
        Some(word)
    }

    fn eat(&mut self, keyword: &str) -> bool {
        if self.peek_keyword().as_deref() == Some(keyword) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, keyword: &str) -> Result<(), AdminError> {
        if self.eat(keyword) {
            Ok(())
        } else {
            Err(self.syntax(keyword))
        }
    }

    fn eat_token(&mut self, token: &Token) -> bool {
        if self.peek() == Some(token) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_token(&mut self, token: &Token, shown: &str) -> Result<(), AdminError> {
        if self.eat_token(token) {
            Ok(())
        } else {
            Err(self.syntax(shown))
        }
    }

    fn syntax(&self, expected: &str) -> AdminError {
        match self.peek() {
            Some(t) => AdminError::Syntax(format!("expected {expected} at or near \"{t}\"")),
            None => AdminError::Syntax(format!("expected {expected} at end of input")),
        }
    }

    /// An auth method: `cert+scram` is three tokens when written bare.
    fn auth_method(&mut self) -> Result<Arg, AdminError> {
        let first = self.arg("auth method (scram, cert or cert+scram)")?;
        if self.eat_token(&Token::Plus) {
            let second = self.arg("auth method after +")?;
            return match (first, second) {
                (Arg::Literal(a), Arg::Literal(b)) => Ok(Arg::Literal(format!("{a}+{b}"))),
                _ => Err(AdminError::Syntax(
                    "write the auth method as one value: 'cert+scram' or $n".to_owned(),
                )),
            };
        }
        Ok(first)
    }

    /// A name or value: an unquoted word (folded to lower case, as PostgreSQL folds
    /// identifiers), a "quoted identifier", a 'string', a number or a `$n` parameter.
    fn arg(&mut self, what: &str) -> Result<Arg, AdminError> {
        let arg = match self.peek() {
            Some(Token::Word(Word {
                value,
                quote_style: None,
                ..
            })) => Arg::Literal(value.to_lowercase()),
            Some(Token::Word(Word { value, .. }) | Token::SingleQuotedString(value)) => {
                Arg::Literal(value.clone())
            }
            Some(Token::Number(n, _)) => Arg::Literal(n.clone()),
            Some(Token::Placeholder(p)) => {
                let n = p
                    .strip_prefix('$')
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| AdminError::Syntax(format!("bad parameter {p}")))?;
                Arg::Param(n)
            }
            _ => return Err(self.syntax(what)),
        };
        self.pos += 1;
        Ok(match arg {
            Arg::Literal(text) if self.tokens.get(self.pos - 1).is_some_and(is_bare) => {
                Arg::Literal(self.hyphenated(text))
            }
            other => other,
        })
    }

    /// Slugs have hyphens, which SQL reads as minus: `acme-co-2` arrives as `acme`, `-`,
    /// `co`, `-`, `2`. Glue such runs back together.
    fn hyphenated(&mut self, mut text: String) -> String {
        while matches!(self.tokens.get(self.pos), Some(Token::Minus))
            && self.tokens.get(self.pos + 1).is_some_and(is_bare)
        {
            text.push('-');
            text.push_str(&bare_text(&self.tokens[self.pos + 1]));
            self.pos += 2;
        }
        text
    }

    /// A setting's name: a word, bare (lower-cased) or "quoted" (as written).
    fn key(&mut self) -> Result<String, AdminError> {
        let key = match self.peek() {
            Some(Token::Word(Word {
                value,
                quote_style: None,
                ..
            })) => value.to_lowercase(),
            Some(Token::Word(Word { value, .. })) => value.clone(),
            _ => return Err(self.syntax("a setting name")),
        };
        self.pos += 1;
        Ok(key)
    }

    /// A setting's value: as [`Cursor::arg`], and a negative number (which the executor
    /// refuses by name rather than as a syntax error).
    fn value(&mut self, key: &str) -> Result<Arg, AdminError> {
        if self.eat_token(&Token::Minus) {
            if let Some(Token::Number(n, _)) = self.peek() {
                let negative = format!("-{n}");
                self.pos += 1;
                return Ok(Arg::Literal(negative));
            }
            return Err(self.syntax(&format!("a value for {key}")));
        }
        self.arg(&format!("a value for {key}"))
    }

    fn opt_arg(&mut self, what: &str) -> Result<Option<Arg>, AdminError> {
        if self.at_end() {
            Ok(None)
        } else {
            self.arg(what).map(Some)
        }
    }

    fn end(&self, command: Command) -> Result<Command, AdminError> {
        match self.peek() {
            None => Ok(command),
            Some(t) => Err(AdminError::Syntax(format!(
                "unexpected \"{t}\" at the end of the command"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Command {
        match parse(sql) {
            Ok(mut c) if c.len() == 1 => c.remove(0),
            other => panic!("{sql}: {other:?}"),
        }
    }

    fn lit(s: &str) -> Arg {
        Arg::Literal(s.to_owned())
    }

    #[test]
    fn tenant_lifecycle_commands() {
        assert_eq!(
            one("CREATE TENANT acme WITH (name = 'Acme Inc', plan = 'business');"),
            Command::CreateTenant {
                slug: lit("acme"),
                name: Some(lit("Acme Inc")),
                plan: Some(lit("business")),
                server: None
            }
        );
        assert_eq!(
            one("create tenant $1"),
            Command::CreateTenant {
                slug: Arg::Param(1),
                name: None,
                plan: None,
                server: None
            }
        );
        assert_eq!(
            one("RESUME TENANT acme-co-2"),
            Command::ResumeTenant {
                slug: lit("acme-co-2")
            }
        );
        assert_eq!(
            one("SUSPEND TENANT acme FORCE"),
            Command::SuspendTenant {
                slug: lit("acme"),
                force: true
            }
        );
        assert_eq!(
            one("DROP TENANT \"acme\" KEEP DATABASE"),
            Command::DropTenant {
                slug: lit("acme"),
                on_drop: DatabaseOnDrop::Keep
            }
        );
        assert_eq!(
            one("MIGRATE ALL TENANTS CONCURRENCY 8"),
            Command::MigrateAll {
                concurrency: Some(lit("8"))
            }
        );
        assert_eq!(
            one("ALTER USER app FOR TENANT acme PASSWORD 'x'"),
            Command::SetUser {
                user: lit("app"),
                tenant: lit("acme"),
                password: Some(lit("x")),
                auth: None,
                replace: true
            }
        );
    }

    #[test]
    fn master_key_commands() {
        assert_eq!(one("rotate master key;"), Command::RotateMasterKey);
        assert_eq!(one("RETIRE OLD MASTER KEYS"), Command::RetireMasterKeys);
        assert_eq!(Command::RotateMasterKey.kind(), "rotate master key");
        assert!(matches!(
            parse("ROTATE MASTER KEY now"),
            Err(AdminError::Syntax(_))
        ));
        assert!(matches!(parse("ROTATE KEY"), Err(AdminError::Syntax(_))));
        assert!(matches!(
            parse("RETIRE MASTER KEYS"),
            Err(AdminError::Syntax(_))
        ));
    }

    #[test]
    fn auth_methods_and_domains() {
        assert_eq!(
            one("CREATE USER app FOR TENANT acme AUTH cert+scram PASSWORD 'x'"),
            Command::SetUser {
                user: lit("app"),
                tenant: lit("acme"),
                password: Some(lit("x")),
                auth: Some(lit("cert+scram")),
                replace: false
            }
        );
        assert_eq!(
            one("ALTER ADMIN USER ops AUTH 'cert'"),
            Command::SetAdminUser {
                user: lit("ops"),
                password: None,
                auth: Some(lit("cert")),
                replace: true
            }
        );
        assert!(parse("ALTER USER app FOR TENANT acme").is_err());
        assert_eq!(
            one("ALTER TENANT acme ADD DOMAIN 'db.acme.com'"),
            Command::TenantDomain {
                slug: lit("acme"),
                domain: lit("db.acme.com"),
                add: true
            }
        );
        assert_eq!(
            one("alter tenant acme drop domain $1"),
            Command::TenantDomain {
                slug: lit("acme"),
                domain: Arg::Param(1),
                add: false
            }
        );
        assert!(parse("ALTER TENANT acme RENAME TO x").is_err());
    }

    #[test]
    fn plans_and_overrides() {
        assert_eq!(
            one("ALTER TENANT acme-co SET PLAN 'business'"),
            Command::SetPlan {
                slug: lit("acme-co"),
                plan: lit("business")
            }
        );
        assert_eq!(
            one("alter tenant $1 set plan $2"),
            Command::SetPlan {
                slug: Arg::Param(1),
                plan: Arg::Param(2)
            }
        );
        assert_eq!(
            one(
                "ALTER TENANT acme SET (pool_size = 8, mode = 'transaction', \"MAX_CLIENTS\" $1, x = -5)"
            ),
            Command::SetOverrides {
                slug: lit("acme"),
                values: vec![
                    ("pool_size".to_owned(), lit("8")),
                    ("mode".to_owned(), lit("transaction")),
                    ("MAX_CLIENTS".to_owned(), Arg::Param(1)),
                    ("x".to_owned(), lit("-5")),
                ]
            }
        );
        assert_eq!(
            one("ALTER TENANT acme RESET (Pool_Size, mode)"),
            Command::ResetOverrides {
                slug: lit("acme"),
                keys: Some(vec!["pool_size".to_owned(), "mode".to_owned()])
            }
        );
        assert_eq!(
            one("ALTER TENANT acme RESET ALL"),
            Command::ResetOverrides {
                slug: lit("acme"),
                keys: None
            }
        );
        assert_eq!(
            one("SHOW PLANS"),
            Command::Show {
                what: ShowWhat::Plans,
                tenant: None
            }
        );
        assert_eq!(
            one("show instances"),
            Command::Show {
                what: ShowWhat::Instances,
                tenant: None
            }
        );
        for bad in [
            "ALTER TENANT acme SET",
            "ALTER TENANT acme SET ()",
            "ALTER TENANT acme SET (pool_size = 8",
            "ALTER TENANT acme SET (pool_size = 8) extra",
            "ALTER TENANT acme SET PLAN",
            "ALTER TENANT acme RESET",
            "ALTER TENANT acme RESET (pool_size",
        ] {
            assert!(matches!(parse(bad), Err(AdminError::Syntax(_))), "{bad}");
        }
        assert_eq!(parameter_count("ALTER TENANT $1 SET (pool_size = $2)"), 2);
    }

    #[test]
    fn pause_and_resume() {
        assert_eq!(one("PAUSE"), Command::Pause { slug: None });
        assert_eq!(
            one("pause acme-co"),
            Command::Pause {
                slug: Some(lit("acme-co"))
            }
        );
        assert_eq!(one("RESUME"), Command::Unpause { slug: None });
        assert_eq!(
            one("RESUME acme"),
            Command::Unpause {
                slug: Some(lit("acme"))
            }
        );
    }

    #[test]
    fn show_and_select() {
        assert_eq!(
            one("show tenant acme"),
            Command::Show {
                what: ShowWhat::Tenants,
                tenant: Some(lit("acme"))
            }
        );
        assert!(matches!(
            one("SELECT slug FROM tenants WHERE state = $1"),
            Command::Select(_)
        ));
        assert_eq!(
            parse("SHOW POOLS; SHOW STATS").map(|c| c.len()).ok(),
            Some(2)
        );
        assert_eq!(one("  ;  "), Command::Empty);
    }

    #[test]
    fn errors_are_typed() {
        assert!(matches!(parse("VACUUM"), Err(AdminError::Unsupported(_))));
        assert!(matches!(parse("CREATE TENANT"), Err(AdminError::Syntax(_))));
        assert!(matches!(parse("SHOW TENANT"), Err(AdminError::Syntax(_))));
        assert!(matches!(
            parse("SUSPEND TENANT a b"),
            Err(AdminError::Syntax(_))
        ));
        assert!(matches!(
            parse("SELECT 'unterminated"),
            Err(AdminError::Syntax(_))
        ));
    }

    #[test]
    fn parameters_are_counted() {
        let sql = "CREATE USER $1 FOR TENANT $2 PASSWORD $3";
        assert_eq!(parameter_count(sql), 3);
    }
}
