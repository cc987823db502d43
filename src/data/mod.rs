//! Text in, token batches out: the data path of a training run.
//!
//! - [`TextTokenizer`]: bytes (a vocabulary of 256, nothing to download) or a Hugging Face
//!   `tokenizer.json`;
//! - [`TextCorpus`]: a UTF-8 file or a folder of them, tokenized into one stream, its tail
//!   held out for evaluation;
//! - [`WindowSampler`]: the training stream cut into windows of `seq_len + 1` tokens,
//!   shuffled per epoch from a seed, and dealt to the ranks by a global position. Rank `r`
//!   of `w` takes its windows from the global order at `position + r · batch`, so the ranks
//!   read disjoint windows, the windows a step trains on do not depend on how they are
//!   split over ranks, and a run resumed at a saved position (on any world size) reads
//!   what the uninterrupted run would have.

mod corpus;
mod sampler;
mod tokenizer;

pub use corpus::TextCorpus;
pub use sampler::WindowSampler;
pub use tokenizer::TextTokenizer;

use std::path::PathBuf;

/// What can go wrong reading and tokenizing text.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the system said (shown in the message, so not also a `source`).
        error: std::io::Error,
    },
    /// A file is not UTF-8 text.
    #[error("{path}: not UTF-8 text (byte {offset} starts an invalid sequence)")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Where the first invalid sequence starts.
        offset: usize,
    },
    /// The tokenizer file could not be loaded, or failed on a text.
    #[error("tokenizer {what}: {message}")]
    Tokenizer {
        /// The tokenizer file, or the text it failed on.
        what: String,
        /// The tokenizers crate's message.
        message: String,
    },
    /// Too little text for what was asked.
    #[error("{what}: {problem}")]
    TooLittle {
        /// The corpus or split.
        what: String,
        /// How much is there and how much is needed.
        problem: String,
    },
}

/// Lets a rank's closure use `?` on the data path's errors.
impl From<DataError> for crate::Error {
    fn from(error: DataError) -> Self {
        crate::Error::External(Box::new(error))
    }
}
