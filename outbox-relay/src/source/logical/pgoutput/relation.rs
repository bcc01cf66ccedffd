//! Tables as `pgoutput` announces them ([`Relation`]) and the values of their tuples
//! ([`TupleValue`]), paired by column name for an `Insert`.

use super::DecodeError;

/// One column of a [`Relation`] as announced by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Flags; bit 1 = part of the replica identity key.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_modifier: i32,
}

/// A `Relation` message: the schema of a table, sent before its first change in each session
/// and again whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation OID, the key that `Insert`/`Update`/`Delete` refer to.
    pub id: u32,
    /// Schema name (`pg_catalog` is sent as an empty string by the server).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting (`d`, `n`, `f`, `i`).
    pub replica_identity: u8,
    /// Columns in tuple order.
    pub columns: Vec<RelationColumn>,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// SQL NULL (`n`).
    Null,
    /// Unchanged TOASTed value (`u`); only appears in updates.
    UnchangedToast,
    /// Text-format value (`t`).
    Text(String),
    /// Binary-format value (`b`); only with the `binary` option, which this relay does not use.
    Binary(Vec<u8>),
}

impl Relation {
    /// Pair an `Insert` tuple with this relation's column names, in column order.
    ///
    /// Guarantee: errors (rather than guessing) when the tuple's width differs from the relation's,
    /// or when a value is in a form the outbox cannot use (unchanged TOAST or binary).
    pub fn named_values<'a>(
        &'a self,
        tuple: &'a [TupleValue],
    ) -> Result<Vec<(&'a str, Option<&'a str>)>, DecodeError> {
        let err = |reason: String| DecodeError {
            message: "Insert",
            reason,
        };
        if tuple.len() != self.columns.len() {
            return Err(err(format!(
                "tuple has {} columns but relation {}.{} has {}",
                tuple.len(),
                self.namespace,
                self.name,
                self.columns.len()
            )));
        }
        self.columns
            .iter()
            .zip(tuple)
            .map(|(col, value)| match value {
                TupleValue::Null => Ok((col.name.as_str(), None)),
                TupleValue::Text(t) => Ok((col.name.as_str(), Some(t.as_str()))),
                TupleValue::UnchangedToast => Err(err(format!(
                    "column {} is an unchanged TOAST value in an insert",
                    col.name
                ))),
                TupleValue::Binary(_) => Err(err(format!(
                    "column {} arrived in binary format; the relay requests text",
                    col.name
                ))),
            })
            .collect()
    }
}
