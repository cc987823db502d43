//! [`TextTokenizer`]: text to token ids and back.

use super::DataError;
use std::path::Path;

/// Turns text into token ids.
pub enum TextTokenizer {
    /// Each UTF-8 byte is a token: a vocabulary of 256, no file needed.
    Bytes,
    /// A Hugging Face tokenizer, from its `tokenizer.json`.
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl TextTokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer { what: path.display().to_string(), message: e.to_string() })?;
        Ok(Self::HuggingFace(Box::new(tokenizer)))
    }

    /// How many distinct ids the tokenizer produces (added tokens included): the model's
    /// vocabulary must be at least this large.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Bytes => 256,
            Self::HuggingFace(tokenizer) => tokenizer.get_vocab_size(true),
        }
    }

    /// The ids of `text`, without special tokens added around it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            Self::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Self::HuggingFace(tokenizer) => {
                let encoding = tokenizer.encode(text, false).map_err(|e| DataError::Tokenizer {
                    what: format!("on {} bytes of text", text.len()),
                    message: e.to_string(),
                })?;
                Ok(encoding.get_ids().to_vec())
            }
        }
    }

    /// The text of `ids`; byte sequences that are not UTF-8 are replaced with U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        match self {
            Self::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&id| u8::try_from(id).unwrap_or(b'?')).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Self::HuggingFace(tokenizer) => tokenizer.decode(ids, true).map_err(|e| DataError::Tokenizer {
                what: format!("decoding {} ids", ids.len()),
                message: e.to_string(),
            }),
        }
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Bytes => "bytes (vocabulary 256)".to_string(),
            Self::HuggingFace(_) => format!("Hugging Face tokenizer (vocabulary {})", self.vocab_size()),
        }
    }
}
