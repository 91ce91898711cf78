//! Providers: one module per source kind, turning verified bytes into
//! [`PresenceUpdate`]s.
//!
//! Providers know nothing of HTTP, of the store or of signatures: they get a
//! [`Verified`] body and return what it means. Field locations and status words
//! are configurable per source ([`fields`], [`status`]), because several
//! providers do not document their payloads.

pub mod extract;
pub mod fields;
pub mod graph;
pub mod graph_rich;
pub mod mitel;
pub mod netsapiens;
pub mod standard;
pub mod status;
pub mod ucwa;

use crate::presence::{CallUpdate, PresenceUpdate};
use crate::verify::Verified;

pub use fields::{FieldOverrides, Fields};
pub use status::StatusMap;

/// What one notification meant.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// Presence changes it carries.
    pub updates: Vec<PresenceUpdate<'a>>,
    /// Call changes it carries.
    pub calls: Vec<CallUpdate<'a>>,
    /// Events acknowledged but not about presence (other topics or models).
    pub ignored: u32,
}

/// Why an authentic body could not be understood. The message is safe to
/// return to the sender: it names fields and pointers, never secrets.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("body is not UTF-8 text")]
    NotUtf8,
    #[error("body is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("expected a JSON {expected}")]
    Shape { expected: &'static str },
    #[error("no {field} found at {tried}")]
    Missing { field: &'static str, tried: String },
    #[error("{field} at {pointer} is {problem}")]
    Invalid {
        field: &'static str,
        pointer: String,
        problem: &'static str,
    },
    #[error("element {index}: {source}")]
    Element {
        index: usize,
        source: Box<ParseError>,
    },
}

/// The parser of one source, chosen by its `kind`.
#[derive(Debug)]
// One per source, built once: the size difference between variants costs
// nothing, and boxing would add an indirection on every request.
#[allow(clippy::large_enum_variant)]
pub enum Parser {
    Mitel(mitel::MitelParser),
    /// UCWA: no bodies to parse (the gateway reads contact presence itself);
    /// its status words.
    Ucwa(StatusMap),
    NetSapiens {
        parser: netsapiens::NetSapiensParser,
        /// The model of posts whose subscription does not say.
        model: netsapiens::Model,
    },
    Standard(standard::StandardParser),
    /// Graph: batches are read by the webhook (`http::graph`); its status
    /// words.
    Graph(StatusMap),
}

/// What verification established besides authenticity, for the parser.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Proof<'a> {
    /// NetSapiens: the model of the subscription the correlation id names.
    pub model: Option<netsapiens::Model>,
    /// Standard Webhooks: the verified `webhook-id`, the event id.
    pub event_id: Option<&'a str>,
}

impl Parser {
    /// Parses one verified notification body with what its verification
    /// established ([`Proof`]).
    pub fn parse<'a>(
        &self,
        body: Verified<'a>,
        proof: Proof<'a>,
    ) -> Result<Parsed<'a>, ParseError> {
        match self {
            Parser::Mitel(p) => p.parse(body),
            Parser::Ucwa(_) => Err(ParseError::Shape {
                expected: "no body: UCWA sources read contact presence themselves",
            }),
            Parser::Graph(_) => Err(ParseError::Shape {
                expected: "a Graph notification batch, read by the Graph webhook",
            }),
            Parser::NetSapiens {
                parser,
                model: default,
            } => parser.parse(body, proof.model.unwrap_or(*default)),
            Parser::Standard(parser) => parser.parse(body, proof.event_id),
        }
    }
}

/// The body as text; every provider here sends JSON, which is UTF-8.
fn body_text(body: Verified<'_>) -> Result<&str, ParseError> {
    std::str::from_utf8(body.bytes()).map_err(|_| ParseError::NotUtf8)
}
