//! The provider-neutral conversation. Providers translate it to their wire format and back, so a
//! fallback provider continues the *same* conversation rather than starting over.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transcript {
    pub system: String,
    pub messages: Vec<Message>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Part>,
}

/// One piece of a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Part {
    Text {
        text: String,
    },
    /// A tool call the assistant made. `arguments` is the parsed JSON object; when the model sent
    /// arguments that are not valid JSON, `raw_arguments` keeps them so the tool layer can say so.
    ToolCall {
        id: String,
        name: String,
        arguments: serde_json::Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        raw_arguments: Option<String>,
    },
    ToolResult {
        call_id: String,
        content: String,
        is_error: bool,
    },
    /// A block only its own provider understands (for example Anthropic thinking blocks), kept so
    /// the assistant turn can be echoed back exactly; other providers skip it.
    Opaque {
        provider: String,
        value: serde_json::Value,
    },
}

/// The text parts of a message, non-empty ones joined by a blank line.
pub fn joined_text(parts: &[Part]) -> String {
    let texts: Vec<&str> = parts
        .iter()
        .filter_map(|p| match p {
            Part::Text { text } if !text.is_empty() => Some(text.as_str()),
            _ => None,
        })
        .collect();
    texts.join("\n\n")
}

impl Transcript {
    pub fn new(system: impl Into<String>, user: impl Into<String>) -> Self {
        Self {
            system: system.into(),
            messages: vec![Message {
                role: Role::User,
                content: vec![Part::Text { text: user.into() }],
            }],
        }
    }

    /// The first user message's text: the request itself.
    pub fn request(&self) -> &str {
        self.messages
            .iter()
            .find(|m| m.role == Role::User)
            .and_then(|m| {
                m.content.iter().find_map(|p| match p {
                    Part::Text { text } => Some(text.as_str()),
                    _ => None,
                })
            })
            .unwrap_or("")
    }

    /// Tool results given so far, with the call each answers, in order.
    pub fn tool_exchanges(&self) -> Vec<(&str, &serde_json::Value, &str, bool)> {
        let mut calls = std::collections::HashMap::new();
        let mut out = Vec::new();
        for message in &self.messages {
            for part in &message.content {
                match part {
                    Part::ToolCall {
                        id,
                        name,
                        arguments,
                        ..
                    } => {
                        calls.insert(id.as_str(), (name.as_str(), arguments));
                    }
                    Part::ToolResult {
                        call_id,
                        content,
                        is_error,
                    } => {
                        if let Some((name, args)) = calls.get(call_id.as_str()) {
                            out.push((*name, *args, content.as_str(), *is_error));
                        }
                    }
                    Part::Text { .. } | Part::Opaque { .. } => {}
                }
            }
        }
        out
    }
}
