//! Chat formatting. Like llama.cpp, a model's chat template picks one of the built-in formats
//! when it is one llama.cpp knows (ChatML, BitNet, Llama 3), and the template itself is rendered
//! with minijinja otherwise, or always with `--jinja`.

use minijinja::{Environment, ErrorKind, context};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChatError {
    #[error("the model has no chat template to render with --jinja")]
    NoTemplate,
    #[error("chat template: {0}")]
    Template(String),
}

/// How a conversation becomes prompt text.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatFormat {
    /// `<|im_start|>role\ncontent<|im_end|>\n`, then `<|im_start|>assistant\n`.
    ChatMl,
    /// bitnet.cpp's format: `System: …<|eot_id|>User: …<|eot_id|>Assistant: `.
    Bitnet,
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`.
    Llama3,
    /// The model's own Jinja template.
    Jinja(String),
}

impl ChatFormat {
    /// The format for a model's template (`None` when it has none): the matching built-in one
    /// unless `jinja`, ChatML when there is no template.
    pub fn for_model(template: Option<&str>, jinja: bool) -> Result<ChatFormat, ChatError> {
        let Some(t) = template else {
            return if jinja {
                Err(ChatError::NoTemplate)
            } else {
                Ok(ChatFormat::ChatMl)
            };
        };
        Ok(if jinja {
            ChatFormat::Jinja(t.into())
        } else if t.contains("<|im_start|>") {
            ChatFormat::ChatMl
        } else if t.contains("BITNET") {
            ChatFormat::Bitnet
        } else if t.contains("<|start_header_id|>") && t.contains("<|end_header_id|>") {
            ChatFormat::Llama3
        } else {
            ChatFormat::Jinja(t.into())
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            ChatFormat::ChatMl => "chatml",
            ChatFormat::Bitnet => "bitnet",
            ChatFormat::Llama3 => "llama3",
            ChatFormat::Jinja(_) => "jinja",
        }
    }

    /// [`ChatFormat::render`] with the BOS and EOS texts of `tokenizer`.
    pub fn render_for(
        &self,
        tokenizer: &crate::tokenizer::Tokenizer,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let (bos, eos) = special_texts(tokenizer);
        self.render(messages, add_generation_prompt, &bos, &eos)
    }

    /// The prompt text for `messages`, ending with the assistant's turn when
    /// `add_generation_prompt`. `bos` and `eos` are the model's token texts (for Jinja).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos: &str,
        eos: &str,
    ) -> Result<String, ChatError> {
        let mut s = String::new();
        match self {
            ChatFormat::ChatMl => {
                for m in messages {
                    s += &format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content);
                }
                if add_generation_prompt {
                    s += "<|im_start|>assistant\n";
                }
            }
            ChatFormat::Bitnet => {
                for m in messages {
                    let role = match m.role.as_str() {
                        "system" => "System",
                        "assistant" => "Assistant",
                        _ => "User",
                    };
                    s += &format!("{role}: {}<|eot_id|>", m.content.trim());
                }
                if add_generation_prompt {
                    s += "Assistant: ";
                }
            }
            ChatFormat::Llama3 => {
                for m in messages {
                    s += &format!(
                        "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                        m.role,
                        m.content.trim()
                    );
                }
                if add_generation_prompt {
                    s += "<|start_header_id|>assistant<|end_header_id|>\n\n";
                }
            }
            ChatFormat::Jinja(template) => {
                let mut env = Environment::new();
                env.set_unknown_method_callback(
                    minijinja_contrib::pycompat::unknown_method_callback,
                );
                env.add_function(
                    "raise_exception",
                    |msg: String| -> Result<String, minijinja::Error> {
                        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
                    },
                );
                let tmpl = env
                    .template_from_str(template)
                    .map_err(|e| ChatError::Template(e.to_string()))?;
                s = tmpl
                    .render(context! {
                        messages => messages,
                        add_generation_prompt => add_generation_prompt,
                        bos_token => bos,
                        eos_token => eos,
                    })
                    .map_err(|e| ChatError::Template(e.to_string()))?;
            }
        }
        Ok(s)
    }
}

/// The texts of a tokenizer's BOS and EOS tokens (empty when it has none), which Jinja chat
/// templates print.
fn special_texts(tokenizer: &crate::tokenizer::Tokenizer) -> (String, String) {
    let text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.spec().tokens.get(i as usize))
            .cloned()
            .unwrap_or_default()
    };
    (text(tokenizer.spec().bos), text(tokenizer.spec().eos))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_is_built_in_and_jinja_renders_the_template() {
        let msgs = [Message::new("user", "What is the capital of France?")];
        let builtin = ChatFormat::for_model(Some(SMOLLM2), false).unwrap();
        assert_eq!(builtin, ChatFormat::ChatMl);
        assert_eq!(
            builtin.render(&msgs, true, "", "").unwrap(),
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        let jinja = ChatFormat::for_model(Some(SMOLLM2), true).unwrap();
        let text = jinja.render(&msgs, true, "", "").unwrap();
        assert!(
            text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
            "{text}"
        );
        assert!(text.ends_with(
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        ));
    }

    #[test]
    fn bitnet_format() {
        let t = "{% for message in messages %}{{ 'Human: ' + message['content'] + '\\n\\nBITNETAssistant: ' + eos_token }}{% endfor %}";
        let f = ChatFormat::for_model(Some(t), false).unwrap();
        assert_eq!(f, ChatFormat::Bitnet);
        let msgs = [
            Message::new("system", "Be brief."),
            Message::new("user", " Hi "),
            Message::new("assistant", "Hello."),
        ];
        assert_eq!(
            f.render(&msgs, true, "", "").unwrap(),
            "System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: Hello.<|eot_id|>Assistant: "
        );
    }

    #[test]
    fn jinja_errors_are_reported() {
        let f = ChatFormat::Jinja("{{ raise_exception('roles must alternate') }}".into());
        let err = f.render(&[], true, "", "").unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
        assert_eq!(
            ChatFormat::for_model(None, true),
            Err(ChatError::NoTemplate)
        );
        assert_eq!(ChatFormat::for_model(None, false), Ok(ChatFormat::ChatMl));
        let f = ChatFormat::for_model(Some("{{ messages[0].content.strip() | upper }}"), false)
            .unwrap();
        assert_eq!(
            f.render(&[Message::new("user", " x ")], false, "", "")
                .unwrap(),
            "X"
        );
    }
}
