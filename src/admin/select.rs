//! Read-only SELECT over one virtual table, from a query sqlparser has parsed: column lists
//! (with aliases), `*`, `count(*)`, WHERE with comparisons, LIKE/ILIKE, IN, BETWEEN, IS NULL,
//! AND/OR/NOT, ORDER BY (names, aliases, positions), LIMIT and OFFSET, and `$n` parameters.
//! Anything else (joins, grouping, subqueries) is refused with 0A000. It evaluates rows it is
//! given; it does not know where tables come from.

use std::cmp::Ordering;

use sqlparser::ast::{
    BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, InTarget,
    LimitClause, OrderByKind, OrderBySort, Query, Select, SelectItem, SetExpr, TableFactor,
    UnaryOperator, Value as SqlValue,
};

use super::error::AdminError;
use super::table::{Column, ColumnType, Table, Value};

/// The single table a SELECT reads, lowercased; `None` for a SELECT without FROM.
pub(super) fn table_name(query: &Query) -> Result<Option<String>, AdminError> {
    let select = plain_select(query)?;
    match select.from.as_slice() {
        [] => Ok(None),
        [from] if from.joins.is_empty() => match &from.relation {
            TableFactor::Table {
                name, args: None, ..
            } => name
                .0
                .last()
                .and_then(|part| part.as_ident())
                .map(|ident| Some(ident.value.to_lowercase()))
                .ok_or_else(|| AdminError::Unsupported(format!("FROM {name}"))),
            other => Err(AdminError::Unsupported(format!("FROM {other}"))),
        },
        _ => Err(AdminError::Unsupported(
            "joins and several tables in FROM".to_owned(),
        )),
    }
}

/// Runs `query` over `table` (rows already gathered). With an empty table it yields the
/// result's columns, which is how Describe learns them.
pub(super) fn run(
    query: &Query,
    table: &Table,
    params: &[Option<String>],
) -> Result<Table, AdminError> {
    let select = plain_select(query)?;
    let ctx = Ctx { table, params };
    let mut rows: Vec<&Vec<Value>> = Vec::new();
    for row in &table.rows {
        let keep = match &select.selection {
            Some(cond) => truth(&ctx.eval(cond, row)?)? == Some(true),
            None => true,
        };
        if keep {
            rows.push(row);
        }
    }
    let projection = Projection::new(&select.projection, table)?;
    let mut out = Table::new(projection.columns(&ctx)?);
    if projection.is_aggregate() {
        out.rows.push(projection.aggregate(rows.len()));
        return Ok(out);
    }
    let mut keyed = Vec::with_capacity(rows.len());
    for row in rows {
        let projected = projection.apply(&ctx, row)?;
        let keys = order_keys(query, &ctx, row, &projected, &out.columns)?;
        keyed.push((keys, projected));
    }
    let directions = order_directions(query);
    keyed.sort_by(|(a, _), (b, _)| compare_keys(a, b, &directions));
    let (offset, limit) = limit_offset(query, &ctx)?;
    out.rows = keyed
        .into_iter()
        .map(|(_, row)| row)
        .skip(offset)
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    Ok(out)
}

fn plain_select(query: &Query) -> Result<&Select, AdminError> {
    if query.with.is_some() {
        return Err(AdminError::Unsupported("WITH".to_owned()));
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err(AdminError::Unsupported(
            "UNION, VALUES and other set operations".to_owned(),
        ));
    };
    if select.distinct.is_some() {
        return Err(AdminError::Unsupported("DISTINCT".to_owned()));
    }
    if !matches!(&select.group_by, GroupByExpr::Expressions(e, _) if e.is_empty())
        || select.having.is_some()
    {
        return Err(AdminError::Unsupported("GROUP BY and HAVING".to_owned()));
    }
    Ok(select)
}

struct Ctx<'a> {
    table: &'a Table,
    params: &'a [Option<String>],
}

impl Ctx<'_> {
    fn column(&self, name: &str) -> Result<usize, AdminError> {
        self.table
            .column_index(name)
            .ok_or_else(|| AdminError::NoSuchColumn(name.to_owned()))
    }

    fn eval(&self, expr: &Expr, row: &[Value]) -> Result<Value, AdminError> {
        match expr {
            Expr::Identifier(ident) => Ok(row[self.column(&ident.value)?].clone()),
            Expr::CompoundIdentifier(parts) => match parts.last() {
                Some(ident) => Ok(row[self.column(&ident.value)?].clone()),
                None => Err(AdminError::Syntax("empty identifier".to_owned())),
            },
            Expr::Value(v) => self.literal(&v.value),
            Expr::Nested(inner) => self.eval(inner, row),
            Expr::UnaryOp { op, expr } => {
                let v = self.eval(expr, row)?;
                match (op, v) {
                    (UnaryOperator::Not, v) => {
                        Ok(truth(&v)?.map_or(Value::Null, |b| Value::Bool(!b)))
                    }
                    (UnaryOperator::Minus, Value::Int(n)) => Ok(Value::Int(-n)),
                    (UnaryOperator::Minus, Value::Float(x)) => Ok(Value::Float(-x)),
                    (UnaryOperator::Plus, v @ (Value::Int(_) | Value::Float(_))) => Ok(v),
                    (op, _) => Err(AdminError::Unsupported(format!("operator {op}"))),
                }
            }
            Expr::BinaryOp { left, op, right } => self.binary(left, op, right, row),
            Expr::IsNull(e) => Ok(Value::Bool(self.eval(e, row)?.is_null())),
            Expr::IsNotNull(e) => Ok(Value::Bool(!self.eval(e, row)?.is_null())),
            Expr::IsTrue(e) => Ok(Value::Bool(truth(&self.eval(e, row)?)? == Some(true))),
            Expr::IsFalse(e) => Ok(Value::Bool(truth(&self.eval(e, row)?)? == Some(false))),
            Expr::Like {
                negated,
                expr,
                pattern,
                any: false,
                ..
            } => self.like(expr, pattern, *negated, false, row),
            Expr::ILike {
                negated,
                expr,
                pattern,
                any: false,
                ..
            } => self.like(expr, pattern, *negated, true, row),
            Expr::In {
                expr,
                target: InTarget::List(list),
                negated,
                ..
            } => {
                let v = self.eval(expr, row)?;
                let mut unknown = v.is_null();
                for item in list {
                    match v.compare(&self.eval(item, row)?) {
                        Some(Ordering::Equal) => return Ok(Value::Bool(!negated)),
                        Some(_) => {}
                        None => unknown = true,
                    }
                }
                Ok(if unknown {
                    Value::Null
                } else {
                    Value::Bool(*negated)
                })
            }
            Expr::Between {
                expr,
                negated,
                low,
                high,
            } => {
                let v = self.eval(expr, row)?;
                let (lo, hi) = (self.eval(low, row)?, self.eval(high, row)?);
                Ok(match (v.compare(&lo), v.compare(&hi)) {
                    (Some(a), Some(b)) => {
                        Value::Bool((a != Ordering::Less && b != Ordering::Greater) != *negated)
                    }
                    _ => Value::Null,
                })
            }
            Expr::Function(f) => {
                let name = f.name.to_string().to_lowercase();
                let arg = match &f.args {
                    FunctionArguments::List(list) if list.args.len() == 1 => match &list.args[0] {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(self.eval(e, row)?),
                        _ => None,
                    },
                    _ => None,
                };
                match (name.as_str(), arg) {
                    ("lower", Some(Value::Text(s))) => Ok(Value::Text(s.to_lowercase())),
                    ("upper", Some(Value::Text(s))) => Ok(Value::Text(s.to_uppercase())),
                    ("lower" | "upper", Some(Value::Null)) => Ok(Value::Null),
                    ("version", None) => Ok(Value::text(version_string())),
                    _ => Err(AdminError::Unsupported(format!("function {}", f.name))),
                }
            }
            other => Err(AdminError::Unsupported(format!("expression {other}"))),
        }
    }

    fn literal(&self, v: &SqlValue) -> Result<Value, AdminError> {
        match v {
            SqlValue::Number(n, _) => Ok(n
                .parse::<i64>()
                .map(Value::Int)
                .or_else(|_| n.parse::<f64>().map(Value::Float))
                .map_err(|_| AdminError::BadValue(format!("invalid number {n}")))?),
            SqlValue::SingleQuotedString(s)
            | SqlValue::EscapedStringLiteral(s)
            | SqlValue::DoubleQuotedString(s) => Ok(Value::Text(s.clone())),
            SqlValue::Boolean(b) => Ok(Value::Bool(*b)),
            SqlValue::Null => Ok(Value::Null),
            SqlValue::Placeholder(p) => {
                let n = p
                    .strip_prefix('$')
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| AdminError::Syntax(format!("bad parameter {p}")))?;
                match self.params.get(n - 1) {
                    Some(v) => Ok(Value::opt_text(v.clone())),
                    None => Err(AdminError::MissingParameter(n)),
                }
            }
            other => Err(AdminError::Unsupported(format!("literal {other}"))),
        }
    }

    fn binary(
        &self,
        left: &Expr,
        op: &BinaryOperator,
        right: &Expr,
        row: &[Value],
    ) -> Result<Value, AdminError> {
        let (l, r) = (self.eval(left, row)?, self.eval(right, row)?);
        let bool_or_null = |b: Option<bool>| b.map_or(Value::Null, Value::Bool);
        match op {
            BinaryOperator::And => Ok(match (truth(&l)?, truth(&r)?) {
                (Some(false), _) | (_, Some(false)) => Value::Bool(false),
                (Some(true), Some(true)) => Value::Bool(true),
                _ => Value::Null,
            }),
            BinaryOperator::Or => Ok(match (truth(&l)?, truth(&r)?) {
                (Some(true), _) | (_, Some(true)) => Value::Bool(true),
                (Some(false), Some(false)) => Value::Bool(false),
                _ => Value::Null,
            }),
            BinaryOperator::Eq => Ok(bool_or_null(l.compare(&r).map(Ordering::is_eq))),
            BinaryOperator::NotEq => Ok(bool_or_null(l.compare(&r).map(Ordering::is_ne))),
            BinaryOperator::Lt => Ok(bool_or_null(l.compare(&r).map(Ordering::is_lt))),
            BinaryOperator::LtEq => Ok(bool_or_null(l.compare(&r).map(Ordering::is_le))),
            BinaryOperator::Gt => Ok(bool_or_null(l.compare(&r).map(Ordering::is_gt))),
            BinaryOperator::GtEq => Ok(bool_or_null(l.compare(&r).map(Ordering::is_ge))),
            other => Err(AdminError::Unsupported(format!("operator {other}"))),
        }
    }

    fn like(
        &self,
        expr: &Expr,
        pattern: &Expr,
        negated: bool,
        fold_case: bool,
        row: &[Value],
    ) -> Result<Value, AdminError> {
        let (v, p) = (self.eval(expr, row)?, self.eval(pattern, row)?);
        if v.is_null() || p.is_null() {
            return Ok(Value::Null);
        }
        let (mut v, mut p) = (v.to_string(), p.to_string());
        if fold_case {
            v = v.to_lowercase();
            p = p.to_lowercase();
        }
        Ok(Value::Bool(like_match(&v, &p) != negated))
    }
}

/// SQL LIKE: `%` any run, `_` one character, `\` escapes.
fn like_match(text: &str, pattern: &str) -> bool {
    let t: Vec<char> = text.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    let (mut ti, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        let (pc, escaped) = match p.get(pi) {
            Some('\\') => (p.get(pi + 1).copied(), true),
            other => (other.copied(), false),
        };
        match pc {
            Some('%') if !escaped => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if (c == '_' && !escaped) || c == t[ti] => {
                ti += 1;
                pi += if escaped { 2 } else { 1 };
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '%')
}

fn truth(v: &Value) -> Result<Option<bool>, AdminError> {
    match v {
        Value::Bool(b) => Ok(Some(*b)),
        Value::Null => Ok(None),
        other => Err(AdminError::BadValue(format!(
            "argument of WHERE must be boolean, not {other}"
        ))),
    }
}

/// The tenantgate version string SHOW VERSION and `version()` report.
pub(super) fn version_string() -> String {
    format!("tenantgate {}", env!("CARGO_PKG_VERSION"))
}

/// What the SELECT list produces.
enum Item<'a> {
    All,
    Expr { expr: &'a Expr, name: String },
    Count { name: String },
}

struct Projection<'a> {
    items: Vec<Item<'a>>,
}

impl<'a> Projection<'a> {
    fn new(list: &'a [SelectItem], table: &Table) -> Result<Projection<'a>, AdminError> {
        let mut items = Vec::new();
        for item in list {
            let (expr, alias) = match item {
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                    items.push(Item::All);
                    continue;
                }
                SelectItem::UnnamedExpr(e) => (e, None),
                SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias.value.clone())),
                other @ SelectItem::ExprWithAliases { .. } => {
                    return Err(AdminError::Unsupported(format!("select item {other}")));
                }
            };
            if is_count(expr) {
                items.push(Item::Count {
                    name: alias.unwrap_or_else(|| "count".to_owned()),
                });
                continue;
            }
            let name = alias.unwrap_or_else(|| default_name(expr));
            items.push(Item::Expr { expr, name });
        }
        let projection = Projection { items };
        let counts = projection
            .items
            .iter()
            .filter(|i| matches!(i, Item::Count { .. }))
            .count();
        if counts > 0 && counts != projection.items.len() {
            return Err(AdminError::Unsupported(
                "count(*) next to plain columns (no GROUP BY)".to_owned(),
            ));
        }
        if table.columns.is_empty() && projection.items.iter().any(|i| matches!(i, Item::All)) {
            return Err(AdminError::Syntax("SELECT * with no table".to_owned()));
        }
        Ok(projection)
    }

    fn is_aggregate(&self) -> bool {
        self.items.iter().any(|i| matches!(i, Item::Count { .. }))
    }

    fn columns(&self, ctx: &Ctx<'_>) -> Result<Vec<Column>, AdminError> {
        let mut out = Vec::new();
        for item in &self.items {
            match item {
                Item::All => out.extend(ctx.table.columns.iter().cloned()),
                Item::Count { name } => out.push(Column::new(name, ColumnType::Int8)),
                Item::Expr { expr, name } => out.push(Column::new(name, expr_type(ctx, expr)?)),
            }
        }
        Ok(out)
    }

    fn aggregate(&self, n: usize) -> Vec<Value> {
        self.items
            .iter()
            .map(|_| Value::Int(i64::try_from(n).unwrap_or(i64::MAX)))
            .collect()
    }

    fn apply(&self, ctx: &Ctx<'_>, row: &[Value]) -> Result<Vec<Value>, AdminError> {
        let mut out = Vec::new();
        for item in &self.items {
            match item {
                Item::All => out.extend(row.iter().cloned()),
                Item::Expr { expr, .. } => out.push(ctx.eval(expr, row)?),
                Item::Count { .. } => out.push(Value::Null),
            }
        }
        Ok(out)
    }
}

fn is_count(expr: &Expr) -> bool {
    let Expr::Function(f) = expr else {
        return false;
    };
    f.name.to_string().eq_ignore_ascii_case("count")
        && matches!(&f.args, FunctionArguments::List(l) if l.args.len() == 1
            && matches!(l.args[0], FunctionArg::Unnamed(FunctionArgExpr::Wildcard)))
}

fn default_name(expr: &Expr) -> String {
    match expr {
        Expr::Identifier(i) => i.value.to_lowercase(),
        Expr::CompoundIdentifier(parts) => parts
            .last()
            .map_or_else(|| "?column?".to_owned(), |i| i.value.to_lowercase()),
        Expr::Function(f) => f.name.to_string().to_lowercase(),
        _ => "?column?".to_owned(),
    }
}

/// The type of a projected expression, known without rows (Describe).
fn expr_type(ctx: &Ctx<'_>, expr: &Expr) -> Result<ColumnType, AdminError> {
    match expr {
        Expr::Identifier(i) => Ok(ctx.table.columns[ctx.column(&i.value)?].ty),
        Expr::CompoundIdentifier(parts) => match parts.last() {
            Some(i) => Ok(ctx.table.columns[ctx.column(&i.value)?].ty),
            None => Err(AdminError::Syntax("empty identifier".to_owned())),
        },
        Expr::Nested(e) => expr_type(ctx, e),
        Expr::Value(v) => Ok(match &v.value {
            SqlValue::Number(n, _) if n.parse::<i64>().is_ok() => ColumnType::Int8,
            SqlValue::Number(..) => ColumnType::Float8,
            SqlValue::Boolean(_) => ColumnType::Bool,
            _ => ColumnType::Text,
        }),
        Expr::BinaryOp { .. }
        | Expr::UnaryOp {
            op: UnaryOperator::Not,
            ..
        }
        | Expr::IsNull(_)
        | Expr::IsNotNull(_)
        | Expr::Like { .. }
        | Expr::ILike { .. }
        | Expr::In { .. }
        | Expr::Between { .. } => Ok(ColumnType::Bool),
        Expr::UnaryOp { expr, .. } => expr_type(ctx, expr),
        _ => Ok(ColumnType::Text),
    }
}

fn order_keys(
    query: &Query,
    ctx: &Ctx<'_>,
    row: &[Value],
    projected: &[Value],
    out_columns: &[Column],
) -> Result<Vec<Value>, AdminError> {
    let Some(order) = &query.order_by else {
        return Ok(Vec::new());
    };
    let OrderByKind::Expressions(exprs) = &order.kind else {
        return Err(AdminError::Unsupported("ORDER BY ALL".to_owned()));
    };
    let mut keys = Vec::with_capacity(exprs.len());
    for o in exprs {
        let key = match &o.expr {
            Expr::Value(v) if matches!(v.value, SqlValue::Number(..)) => {
                let SqlValue::Number(n, _) = &v.value else {
                    unreachable!("matched above")
                };
                let position = n
                    .parse::<usize>()
                    .ok()
                    .filter(|p| (1..=projected.len()).contains(p))
                    .ok_or_else(|| {
                        AdminError::BadValue(format!("ORDER BY position {n} is not in select list"))
                    })?;
                projected[position - 1].clone()
            }
            Expr::Identifier(i) if ctx.table.column_index(&i.value).is_none() => {
                match out_columns
                    .iter()
                    .position(|c| c.name.eq_ignore_ascii_case(&i.value))
                {
                    Some(idx) => projected[idx].clone(),
                    None => return Err(AdminError::NoSuchColumn(i.value.clone())),
                }
            }
            e => ctx.eval(e, row)?,
        };
        keys.push(key);
    }
    Ok(keys)
}

/// Per ORDER BY key: descending?
fn order_directions(query: &Query) -> Vec<bool> {
    match &query.order_by {
        Some(order) => match &order.kind {
            OrderByKind::Expressions(exprs) => exprs
                .iter()
                .map(|o| matches!(o.options.sort, Some(OrderBySort::Desc)))
                .collect(),
            OrderByKind::All(_) => Vec::new(),
        },
        None => Vec::new(),
    }
}

fn compare_keys(a: &[Value], b: &[Value], descending: &[bool]) -> Ordering {
    for ((x, y), desc) in a.iter().zip(b).zip(descending) {
        let ord = x.sort_cmp(y);
        let ord = if *desc { ord.reverse() } else { ord };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    Ordering::Equal
}

fn limit_offset(query: &Query, ctx: &Ctx<'_>) -> Result<(usize, Option<usize>), AdminError> {
    let number = |e: &Expr| -> Result<usize, AdminError> {
        match ctx.eval(e, &[])? {
            Value::Int(n) => usize::try_from(n)
                .map_err(|_| AdminError::BadValue("LIMIT and OFFSET must not be negative".into())),
            Value::Text(s) => s
                .trim()
                .parse::<usize>()
                .map_err(|_| AdminError::BadValue(format!("invalid LIMIT or OFFSET {s:?}"))),
            other => Err(AdminError::BadValue(format!(
                "invalid LIMIT or OFFSET {other}"
            ))),
        }
    };
    match &query.limit_clause {
        None => Ok((0, None)),
        Some(LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        }) if limit_by.is_empty() => {
            let offset = match offset {
                Some(o) => number(&o.value)?,
                None => 0,
            };
            let limit = match limit {
                Some(l) => Some(number(l)?),
                None => None,
            };
            Ok((offset, limit))
        }
        Some(other) => Err(AdminError::Unsupported(format!("{other}"))),
    }
}

#[cfg(test)]
mod tests {
    use sqlparser::ast::Statement;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    use super::*;

    fn table() -> Table {
        let mut t = Table::new(vec![
            Column::new("slug", ColumnType::Text),
            Column::new("state", ColumnType::Text),
            Column::new("clients", ColumnType::Int8),
        ]);
        for (slug, state, n) in [
            ("acme", "active", 3),
            ("beta", "suspended", 0),
            ("corp", "active", 7),
        ] {
            t.rows
                .push(vec![Value::text(slug), Value::text(state), Value::Int(n)]);
        }
        t
    }

    fn q(sql: &str) -> Table {
        let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap_or_default();
        let Some(Statement::Query(query)) = stmts.into_iter().next() else {
            panic!("not a query: {sql}");
        };
        run(&query, &table(), &[Some("beta".to_owned())]).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn col0(t: &Table) -> Vec<String> {
        t.rows.iter().map(|r| r[0].to_string()).collect()
    }

    #[test]
    fn filters_orders_limits() {
        assert_eq!(
            col0(&q(
                "SELECT slug FROM tenants WHERE state = 'active' ORDER BY clients DESC"
            )),
            ["corp", "acme"]
        );
        assert_eq!(
            col0(&q(
                "SELECT slug FROM t WHERE slug LIKE '%e%' OR NOT clients > 1"
            )),
            ["acme", "beta"]
        );
        assert_eq!(
            col0(&q(
                "SELECT slug FROM t WHERE slug IN ('beta', 'corp') ORDER BY 1 LIMIT 1 OFFSET 1"
            )),
            ["corp"]
        );
        assert_eq!(
            col0(&q("SELECT slug AS s FROM t WHERE slug = $1")),
            ["beta"]
        );
        assert_eq!(
            col0(&q("SELECT count(*) FROM t WHERE clients BETWEEN 1 AND 5")),
            ["1"]
        );
        assert_eq!(q("SELECT * FROM t").columns.len(), 3);
        assert_eq!(q("SELECT slug AS s, clients FROM t").columns[0].name, "s");
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        for sql in [
            "SELECT slug FROM t GROUP BY slug",
            "SELECT nope FROM t",
            "SELECT slug, count(*) FROM t",
        ] {
            let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap_or_default();
            let Some(Statement::Query(query)) = stmts.into_iter().next() else {
                panic!("not a query");
            };
            assert!(run(&query, &table(), &[]).is_err(), "{sql}");
        }
    }

    #[test]
    fn like_patterns() {
        assert!(like_match("acme-co", "acme%"));
        assert!(like_match("acme", "a_m_"));
        assert!(!like_match("acme", "b%"));
        assert!(like_match("50%", "50\\%"));
        assert!(like_match("", "%"));
    }
}
