//! Collecting several independent compile errors into one [`syn::Error`].

use syn::{Error, Result};

/// Errors found so far; reported together so the user sees every mistake at once, each at its
/// own span.
#[derive(Default)]
pub(crate) struct Errors(Option<Error>);

impl Errors {
    /// Records `error`.
    pub(crate) fn push(&mut self, error: Error) {
        match &mut self.0 {
            Some(errors) => errors.combine(error),
            None => self.0 = Some(error),
        }
    }

    /// The value of `result`, or `None` after recording its error.
    pub(crate) fn take<T>(&mut self, result: Result<T>) -> Option<T> {
        result.map_err(|error| self.push(error)).ok()
    }

    /// `Ok` if nothing was recorded, else all recorded errors.
    pub(crate) fn finish(self) -> Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}
