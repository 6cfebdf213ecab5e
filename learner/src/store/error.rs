//! Store errors: what went wrong and during which operation, with the driver's error as
//! the source. Callers convert them at one boundary (gRPC status, API response) and
//! never show their text to agents or users.

use bulkhead_model::{LabelError, ProposalStatus};

use super::Backend;
use super::audit::ChainBreak;
use crate::auth::{AuthError, UsernameProblem};

/// Everything the store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no backend we support.
    #[error("unsupported store URL scheme {scheme:?}: expected sqlite:// or postgres://")]
    UnsupportedUrl { scheme: String },

    /// The URL could not be parsed into connection options.
    #[error("invalid {backend:?} store URL")]
    InvalidUrl {
        backend: Backend,
        #[source]
        source: sqlx::Error,
    },

    /// Could not connect (or create the SQLite file).
    #[error("could not connect to the {backend:?} store")]
    Connect {
        backend: Backend,
        #[source]
        source: sqlx::Error,
    },

    /// Applying the embedded migrations failed.
    #[error("could not migrate the {backend:?} store")]
    Migrate {
        backend: Backend,
        #[source]
        source: sqlx::migrate::MigrateError,
    },

    /// A statement failed; `operation` names the store call it belonged to.
    #[error("store operation {operation} failed")]
    Database {
        operation: &'static str,
        #[source]
        source: sqlx::Error,
    },

    /// A value from the caller does not fit the schema (e.g. a u64 above i64::MAX where
    /// the value must round-trip exactly).
    #[error("{field} = {value} is out of the storable range")]
    OutOfRange { field: &'static str, value: u64 },

    /// A verdict event's HTTP request line is not one an enforcer can send
    /// (`HttpRequestLine::validate`: bounded, visible ASCII). Every reader prints the
    /// stored line as is, so the store holds it to that.
    #[error("invalid HTTP request line: {reason}")]
    InvalidHttpLine { reason: &'static str },

    /// A stored value does not decode into the domain type; the database was changed
    /// behind the store's back or a migration is missing.
    #[error("stored {table}.{column} holds an invalid value: {value}")]
    InvalidStoredValue { table: &'static str, column: &'static str, value: String },

    /// A stored label set is no longer valid canonical JSON.
    #[error("stored labels of identity {identity} are invalid")]
    CorruptLabels {
        identity: i64,
        #[source]
        source: LabelError,
    },

    /// A stored JSON column (endpoint addresses, cgroups) does not parse.
    #[error("stored {table}.{column} is not valid JSON")]
    CorruptJson {
        table: &'static str,
        column: &'static str,
        #[source]
        source: serde_json::Error,
    },

    /// Two different label sets share a SHA-256 digest. Never expected; refusing beats
    /// handing one workload another's identity.
    #[error("identity {identity} has the same labels digest as a different label set")]
    DigestCollision { identity: i64 },

    /// A domain object (proposal, policy, audit detail) could not be serialised for
    /// storage.
    #[error("could not encode the {what} as JSON")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    /// A required text (actor, action, subject) is empty or blank: an audit entry
    /// nobody can attribute is worthless.
    #[error("{field} must not be empty")]
    MissingField { field: &'static str },

    /// A rejection must say why; the next analyst reads it.
    #[error("rejecting proposal {id} needs a comment")]
    CommentRequired { id: i64 },

    /// No proposal has this id.
    #[error("proposal {id} does not exist")]
    ProposalNotFound { id: i64 },

    /// The proposal is not in a state the requested step starts from (already decided,
    /// superseded, not approved yet…). Concurrent decisions: the loser gets this.
    #[error("proposal {id} is {from:?}; it cannot become {to:?}")]
    InvalidTransition { id: i64, from: ProposalStatus, to: ProposalStatus },

    /// The identity named as a target was never allocated.
    #[error("identity {identity} does not exist")]
    UnknownIdentity { identity: u32 },

    /// The audit log's hash chain does not verify: it was changed outside the store.
    #[error("audit log entry {id} fails verification: {kind}")]
    AuditChainBroken { id: i64, kind: ChainBreak },

    /// One import named the same NetworkPolicy twice.
    #[error("cluster policy {namespace}/{name} appears twice in one import")]
    DuplicateClusterPolicy { namespace: String, name: String },

    /// A username does not pass `auth::Username::parse`.
    #[error("invalid username: {problem}")]
    InvalidUsername { problem: UsernameProblem },

    /// A user with this name (compared case-insensitively) exists already.
    #[error("user {username:?} already exists")]
    UserExists { username: String },

    /// No user has this name.
    #[error("user {username:?} does not exist")]
    UserNotFound { username: String },

    /// A login failed: unknown user, wrong password or disabled user — deliberately one
    /// answer, so it does not tell which names exist.
    #[error("invalid username or password")]
    InvalidCredentials,

    /// An API token name is blank, longer than 64 characters or holds control characters.
    #[error("an API token name needs 1 to 64 characters and no control characters")]
    InvalidTokenName,

    /// The user already has a live API token with this name.
    #[error("user {username:?} already has a token named {name:?}")]
    TokenNameTaken { username: String, name: String },

    /// No live API token has this id.
    #[error("API token {id} does not exist or is revoked")]
    ApiTokenNotFound { id: i64 },

    /// Making a secret failed (the OS random source) or hashing refused its input.
    #[error("could not make a credential")]
    Credential {
        #[source]
        source: AuthError,
    },

    /// A blocking task (password hashing) did not finish.
    #[error("the password check did not finish")]
    Blocking {
        #[source]
        source: tokio::task::JoinError,
    },
}

impl StoreError {
    pub(crate) fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| StoreError::Database { operation, source }
    }

    /// Like [`StoreError::db`], except that a foreign-key violation means the target
    /// identity does not exist (the only foreign key the statement can violate).
    pub(crate) fn db_target(operation: &'static str, identity: u32) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| match &source {
            sqlx::Error::Database(e) if e.is_foreign_key_violation() => StoreError::UnknownIdentity { identity },
            _ => StoreError::Database { operation, source },
        }
    }

    /// True when retrying the same call may succeed (deadlock, serialization failure,
    /// busy database, exhausted pool). Callers that cannot retry (gRPC ingest) just let
    /// the agent resend.
    pub fn is_transient(&self) -> bool {
        let StoreError::Database { source, .. } = self else {
            return false;
        };
        match source {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => true,
            sqlx::Error::Database(e) => matches!(
                e.code().as_deref(),
                // PostgreSQL: serialization_failure, deadlock_detected.
                Some("40001") | Some("40P01")
                // SQLite: SQLITE_BUSY (5), SQLITE_LOCKED (6) and their extended codes.
                | Some("5") | Some("6") | Some("261") | Some("517") | Some("262")
            ),
            _ => false,
        }
    }
}
