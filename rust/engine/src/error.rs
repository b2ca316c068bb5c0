//! The engine's single error type. Every variant names the file, array or key involved so
//! that a message read in a notebook says where to look.

use std::path::Path;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path (group, array, CSV, label folder) does not exist.
    #[error("{path}: no such file or directory{detail}")]
    NotFound {
        /// The missing path.
        path: String,
        /// Optional extra context, starting with a separator.
        detail: String,
    },
    /// Metadata exists but is malformed or not understood (JSON, multiscales, axes...).
    #[error("{path}: {message}")]
    Metadata {
        /// The file or group whose metadata is bad.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A chunk could not be read or decoded (corrupt bytes, unknown codec...).
    #[error("{path}: {message}")]
    Decode {
        /// The array (and chunk) involved.
        path: String,
        /// The decoder's complaint.
        message: String,
    },
    /// The caller asked for something that cannot be done (bad shape, unknown key...).
    #[error("{0}")]
    InvalidArgument(String),
    /// An operating-system error on a path (permissions, disk full...).
    #[error("{path}: {source}")]
    Io {
        /// The path the operation was on.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A wait ran past its limit (e.g. rank 0 waiting for the other ranks' chunks).
    #[error("{0}")]
    TimedOut(String),
    /// The operation was cancelled (e.g. Ctrl-C or a stopped loader).
    #[error("operation interrupted")]
    Interrupted,
    /// A bug in the engine (a panic caught on an engine thread); never the user's input.
    #[error("internal engine error (please report): {0}")]
    Internal(String),
}

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A `NotFound` for `path` with no extra detail.
    pub fn not_found(path: impl AsRef<Path>) -> Self {
        Error::NotFound {
            path: path.as_ref().display().to_string(),
            detail: String::new(),
        }
    }

    /// A `NotFound` with an explanation appended (e.g. which class listed it).
    pub fn not_found_because(path: impl AsRef<Path>, why: impl std::fmt::Display) -> Self {
        Error::NotFound {
            path: path.as_ref().display().to_string(),
            detail: format!(" ({why})"),
        }
    }

    /// A `Metadata` error on `path`.
    pub fn metadata(path: impl AsRef<Path>, message: impl std::fmt::Display) -> Self {
        Error::Metadata {
            path: path.as_ref().display().to_string(),
            message: message.to_string(),
        }
    }

    /// A `Decode` error on `path`.
    pub fn decode(path: impl AsRef<Path>, message: impl std::fmt::Display) -> Self {
        Error::Decode {
            path: path.as_ref().display().to_string(),
            message: message.to_string(),
        }
    }

    /// An `InvalidArgument` error.
    pub fn invalid(message: impl std::fmt::Display) -> Self {
        Error::InvalidArgument(message.to_string())
    }

    /// An `Io` error on `path`; a missing file becomes `NotFound`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            return Error::not_found(path);
        }
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// The same error with `context` (e.g. which sample was being read) added to its message;
    /// the category is kept.
    pub fn with_context(self, context: impl std::fmt::Display) -> Self {
        match self {
            Error::NotFound { path, detail } => Error::NotFound {
                path,
                detail: format!("{detail} ({context})"),
            },
            Error::Metadata { path, message } => Error::Metadata {
                path,
                message: format!("{message} ({context})"),
            },
            Error::Decode { path, message } => Error::Decode {
                path,
                message: format!("{message} ({context})"),
            },
            Error::InvalidArgument(message) => Error::InvalidArgument(format!("{message} ({context})")),
            Error::Io { path, source } => Error::Io {
                path: format!("{path} ({context})"),
                source,
            },
            Error::Internal(message) => Error::Internal(format!("{message} ({context})")),
            Error::TimedOut(message) => Error::TimedOut(format!("{message} ({context})")),
            Error::Interrupted => Error::Interrupted,
        }
    }

    /// An `Internal` error from a caught panic's payload.
    pub fn from_panic(payload: Box<dyn std::any::Any + Send>) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        Error::Internal(message)
    }

    /// Whether retrying the same read may succeed (an interrupted or timed-out system call, a
    /// busy resource, an I/O error the device reported).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Io { source, .. } => {
                use std::io::ErrorKind as K;
                matches!(source.kind(), K::Interrupted | K::TimedOut | K::WouldBlock | K::ResourceBusy) || source.raw_os_error() == Some(5)
                // EIO
            }
            _ => false,
        }
    }

    /// The Python-facing category of this error (used by the binding to pick an exception).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Metadata { .. } => ErrorKind::Metadata,
            Error::Decode { .. } => ErrorKind::Decode,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            Error::Io { .. } => ErrorKind::Io,
            Error::TimedOut(_) => ErrorKind::TimedOut,
            Error::Interrupted => ErrorKind::Interrupted,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }
}

impl Error {
    /// A copy of this error (a shared result handed to every reader, e.g. a remote request
    /// started ahead).
    pub(crate) fn clone_error(&self) -> Error {
        match self {
            Error::NotFound { path, detail } => Error::NotFound {
                path: path.clone(),
                detail: detail.clone(),
            },
            Error::Io { path, source } => Error::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::Metadata { path, message } => Error::Metadata {
                path: path.clone(),
                message: message.clone(),
            },
            Error::Decode { path, message } => Error::Decode {
                path: path.clone(),
                message: message.clone(),
            },
            Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
            Error::TimedOut(m) => Error::TimedOut(m.clone()),
            Error::Interrupted => Error::Interrupted,
            Error::Internal(m) => Error::Internal(m.clone()),
        }
    }
}

/// Coarse error categories, one per Python exception class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `FileNotFoundError`
    NotFound,
    /// `ValueError` (bad metadata)
    Metadata,
    /// `OSError`-like decode failure
    Decode,
    /// `ValueError` (bad argument)
    InvalidArgument,
    /// `PermissionError`
    PermissionDenied,
    /// `FileExistsError` (an output that is already there)
    AlreadyExists,
    /// `OSError`
    Io,
    /// `TimeoutError` (a wait ran past its limit)
    TimedOut,
    /// `KeyboardInterrupt`
    Interrupted,
    /// `CellMapError` (an engine bug)
    Internal,
}
