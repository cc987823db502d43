//! [`TextCorpus`]: a file or a folder of UTF-8 text as one token stream, split into training
//! and held-out tokens.

use super::{DataError, TextTokenizer};
use std::path::{Path, PathBuf};

/// An error reading `path`.
fn io(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |error| DataError::Io { path: path.to_path_buf(), error }
}

/// The tokens of a text corpus.
pub struct TextCorpus {
    /// The training tokens: every file's tokens in file order, but the held-out tail.
    pub train: Vec<u32>,
    /// The last tokens of the stream, held out for evaluation.
    pub eval: Vec<u32>,
    /// The files read, in the order their tokens appear.
    pub files: Vec<PathBuf>,
}

impl TextCorpus {
    /// Reads `path` (a UTF-8 file, or a folder whose files, not its subfolders, are read in
    /// name order), tokenizes each file with `tokenizer` and holds out the last
    /// `eval_fraction` (0 to 0.5) of the tokens.
    pub fn load(path: &Path, tokenizer: &TextTokenizer, eval_fraction: f64) -> Result<Self, DataError> {
        if !(0.0..=0.5).contains(&eval_fraction) {
            return Err(DataError::TooLittle {
                what: path.display().to_string(),
                problem: format!("the held-out fraction must be between 0 and 0.5, not {eval_fraction}"),
            });
        }
        let files = if std::fs::metadata(path).map_err(io(path))?.is_dir() {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(path).map_err(io(path))? {
                let entry = entry.map_err(io(path))?;
                if entry.file_type().map_err(io(path))?.is_file() {
                    files.push(entry.path());
                }
            }
            files.sort();
            files
        } else {
            vec![path.to_path_buf()]
        };
        let mut tokens = Vec::new();
        for file in &files {
            let bytes = std::fs::read(file).map_err(io(file))?;
            let text = std::str::from_utf8(&bytes)
                .map_err(|e| DataError::NotUtf8 { path: file.clone(), offset: e.valid_up_to() })?;
            tokens.extend(tokenizer.encode(text)?);
        }
        if tokens.len() < 2 {
            return Err(DataError::TooLittle {
                what: path.display().to_string(),
                problem: format!("{} token(s) in {} file(s); training needs at least 2", tokens.len(), files.len()),
            });
        }
        let held_out = (tokens.len() as f64 * eval_fraction).round() as usize;
        let eval = tokens.split_off(tokens.len() - held_out);
        Ok(Self { train: tokens, eval, files })
    }

    /// A fingerprint of the training tokens (their count and an FNV-1a hash): a run resumed
    /// on other data is recognised by it.
    pub fn fingerprint(&self) -> String {
        let hash = self.train.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &token| {
            token.to_le_bytes().iter().fold(hash, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
        });
        format!("{} tokens, fnv1a {hash:016x}", self.train.len())
    }
}
