//! Reading a Hugging Face `config.json` by allow-list: every key is read, checked to hold
//! the one value the model computes, or known not to change the computation; a key that
//! is none of these is refused by name, never ignored. A model's reader takes the keys it
//! understands out of an [`HfConfig`] and ends with [`HfConfig::finish`].

use candle_core::Result;
use serde_json::{Map, Value};

/// Keys that describe how a model is stored, tokenized, named or sampled from, never what
/// its forward computes.
const NOT_COMPUTED: &[&str] = &[
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "tokenizer_class",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "torchscript",
    "id2label",
    "label2id",
    "problem_type",
    "finetuning_task",
    "prefix",
    "task_specific_params",
    "is_llama_config",
    "use_bfloat16",
    "tf_legacy_loss",
    "cross_attention_hidden_size",
    // Sampling defaults that older releases kept in the model's config.
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
];

/// Settings of every transformers model that older releases wrote out at their default,
/// which is the only value the models here compute.
const AT_DEFAULT: [(&str, &str); 6] = [
    ("is_encoder_decoder", "false"),
    ("is_decoder", "false"),
    ("add_cross_attention", "false"),
    ("tie_encoder_decoder", "false"),
    ("pruned_heads", "{}"),
    ("chunk_size_feed_forward", "0"),
];

/// A parsed `config.json` whose keys are taken out as they are read.
pub(crate) struct HfConfig {
    /// What the error messages call the file's model ("Llama").
    model: &'static str,
    keys: Map<String, Value>,
}

impl HfConfig {
    pub fn parse(text: &str, model: &'static str) -> Result<Self> {
        let keys: Map<String, Value> = serde_json::from_str(text)
            .map_err(|e| candle_core::Error::Msg(format!("not a {model} config.json: {e}")))?;
        Ok(Self { model, keys })
    }

    /// An error naming `key` and what is wrong with it.
    pub fn refuse<T>(&self, what: String) -> Result<T> {
        candle_core::bail!("{what}: this {} model does not implement it, so the checkpoint is refused", self.model)
    }

    /// Takes `key` out; `None` when it is absent or null.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.keys.remove(key).filter(|v| !v.is_null())
    }

    fn typed<T>(
        &self,
        key: &str,
        value: Option<Value>,
        read: impl Fn(&Value) -> Option<T>,
        kind: &str,
    ) -> Result<Option<T>> {
        match value {
            None => Ok(None),
            Some(value) => match read(&value) {
                Some(v) => Ok(Some(v)),
                None => candle_core::bail!("`{key}` is {value}, not {kind}"),
            },
        }
    }

    /// A non-negative integer, if given.
    pub fn usize(&mut self, key: &str) -> Result<Option<usize>> {
        let value = self.take(key);
        self.typed(key, value, |v| v.as_u64().map(|n| n as usize), "a non-negative integer")
    }

    /// A non-negative integer that must be given.
    pub fn required_usize(&mut self, key: &str) -> Result<usize> {
        self.usize(key)?.ok_or_else(|| candle_core::Error::Msg(format!("`{key}` is missing")))
    }

    /// A number, if given.
    pub fn f64(&mut self, key: &str) -> Result<Option<f64>> {
        let value = self.take(key);
        self.typed(key, value, Value::as_f64, "a number")
    }

    /// `key` where null means "none" and a missing key means the model class's default
    /// `absent` (as transformers reads `sliding_window` or a soft cap).
    fn nullable<T>(
        &mut self,
        key: &str,
        absent: Option<T>,
        read: impl Fn(&Value) -> Option<T>,
        kind: &str,
    ) -> Result<Option<T>> {
        match self.keys.remove(key) {
            None => Ok(absent),
            Some(Value::Null) => Ok(None),
            Some(value) => self.typed(key, Some(value), read, kind),
        }
    }

    /// A non-negative integer, null for none, `absent` when missing.
    pub fn nullable_usize(&mut self, key: &str, absent: Option<usize>) -> Result<Option<usize>> {
        self.nullable(key, absent, |v| v.as_u64().map(|n| n as usize), "a non-negative integer or null")
    }

    /// A number, null for none, `absent` when missing.
    pub fn nullable_f64(&mut self, key: &str, absent: Option<f64>) -> Result<Option<f64>> {
        self.nullable(key, absent, Value::as_f64, "a number or null")
    }

    /// A boolean, if given.
    pub fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        let value = self.take(key);
        self.typed(key, value, Value::as_bool, "a boolean")
    }

    /// A string, if given.
    pub fn string(&mut self, key: &str) -> Result<Option<String>> {
        let value = self.take(key);
        self.typed(key, value, |v| v.as_str().map(str::to_string), "a string")
    }

    /// An object, if given.
    pub fn object(&mut self, key: &str) -> Result<Option<Map<String, Value>>> {
        let value = self.take(key);
        self.typed(key, value, |v| v.as_object().cloned(), "an object")
    }

    /// Refuses `key` unless it is absent, null or `computed` (the one value the model
    /// computes).
    pub fn only(&mut self, key: &str, computed: Value) -> Result<()> {
        match self.take(key) {
            Some(value) if value != computed => self.refuse(format!("`{key}` is {value} (only {computed})")),
            _ => Ok(()),
        }
    }

    /// Ends the reading of a transformers `config.json`: the keys that do not change the
    /// computation go, and any key left is refused by name.
    pub fn finish(mut self) -> Result<()> {
        for (key, default) in AT_DEFAULT {
            if let Some(value) = self.take(key) {
                if value != serde_json::from_str::<Value>(default).expect("a JSON literal") {
                    return self.refuse(format!("`{key}` is {value} (only {default})"));
                }
            }
        }
        self.finish_except(NOT_COMPUTED)
    }

    /// Ends the reading of another file of the format: the keys of `not_computed` go, and
    /// any key left is refused by name.
    pub fn finish_except(mut self, not_computed: &[&str]) -> Result<()> {
        self.keys.retain(|key, _| !not_computed.contains(&key.as_str()));
        let left: Vec<String> = self.keys.keys().map(|k| format!("`{k}`")).collect();
        if left.is_empty() {
            return Ok(());
        }
        candle_core::bail!(
            "{} {} this {} reader does not know: refused rather than ignored, since {} could change what the \
             model computes",
            if left.len() == 1 { "key" } else { "keys" },
            left.join(", "),
            self.model,
            if left.len() == 1 { "it" } else { "they" },
        )
    }
}

/// Reads the keys of a nested object (`rope_scaling`, `rope_parameters`) the same way,
/// its errors naming `parent.key`.
pub(crate) struct HfObject {
    parent: &'static str,
    keys: Map<String, Value>,
}

impl HfObject {
    pub fn new(parent: &'static str, keys: Map<String, Value>) -> Self {
        Self { parent, keys }
    }

    /// The number `key` must hold.
    pub fn required_f64(&mut self, key: &str) -> Result<f64> {
        match self.keys.remove(key) {
            Some(value) => value
                .as_f64()
                .ok_or_else(|| candle_core::Error::Msg(format!("`{}.{key}` is {value}, not a number", self.parent))),
            None => candle_core::bail!("`{}.{key}` is missing", self.parent),
        }
    }

    /// The string `key`, if given.
    pub fn string(&mut self, key: &str) -> Result<Option<String>> {
        match self.keys.remove(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => candle_core::bail!("`{}.{key}` is {other}, not a string", self.parent),
        }
    }

    /// Takes `key` out, if present and not null.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.keys.remove(key).filter(|v| !v.is_null())
    }

    /// The object's name in messages.
    pub fn parent(&self) -> &'static str {
        self.parent
    }

    /// Refuses any key not read.
    pub fn finish(self) -> Result<()> {
        match self.keys.keys().next() {
            None => Ok(()),
            Some(key) => candle_core::bail!(
                "`{}.{key}` is a key this reader does not know: refused rather than ignored",
                self.parent
            ),
        }
    }
}
