//! The wire format of `/ws`: the frames a client may send, the control frames the server
//! answers with, the channel names, and the data frame `{"channel", "seq", "data"}`.
//!
//! Pure (no I/O), so every parsing rule is unit-tested here. What this module may not do:
//! decide who may read a channel — [`Channel`] only names one; the connection ties `orders` and
//! `notifications` to the authenticated user.

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vault_core::domain::Symbol;

/// The most channels one `subscribe` or `unsubscribe` frame may name (there are fewer real
/// channels than this: one per market plus `orders` and `notifications`).
pub const MAX_CHANNELS_PER_FRAME: usize = 32;

/// A frame from the client. Unknown fields are refused, as in REST bodies.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientFrame {
    /// Must be the first frame: an access JWT or an API key.
    Auth {
        token: String,
    },
    Subscribe {
        channels: Vec<String>,
    },
    Unsubscribe {
        channels: Vec<String>,
    },
    /// An application-level ping; answered with `{"op":"pong"}`.
    Ping,
    /// The answer to the server's `{"op":"ping"}`.
    Pong,
}

impl ClientFrame {
    /// Parses one text frame; the error is a sentence for the client's `error` frame.
    pub fn parse(text: &str) -> Result<ClientFrame, String> {
        serde_json::from_str(text).map_err(|e| {
            format!(
                "Not a valid frame ({e}); send {{\"op\":\"auth\"|\"subscribe\"|\"unsubscribe\"|\"ping\"|\"pong\", …}}."
            )
        })
    }
}

/// A control frame from the server. Control frames carry no `seq`: only data frames count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    /// The auth frame was accepted.
    Authenticated {
        user_id: Uuid,
    },
    /// The channels of one `subscribe` frame are live: every message published from now on is
    /// delivered.
    Subscribed {
        channels: &'a [String],
    },
    Unsubscribed {
        channels: &'a [String],
    },
    /// Sent every ping interval; any frame from the client counts as an answer.
    Ping,
    /// The answer to a client's `{"op":"ping"}`.
    Pong,
    /// Something the client sent was refused. `channel` names the offending channel, if any.
    Error {
        code: &'a str,
        detail: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
    },
}

impl ServerFrame<'_> {
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("control frames are plain JSON objects")
    }
}

/// A channel a connection can subscribe to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Channel {
    /// `prices:<SYMBOL>`: every tick of one market.
    Prices(Symbol),
    /// `orders`: the user's own order events.
    Orders,
    /// `notifications`: the user's own in-app notifications.
    Notifications,
}

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelError {
    /// Not `prices:<SYMBOL>`, `orders` or `notifications`.
    Unknown(String),
    /// `prices:<SYMBOL>` where the symbol is not a market.
    UnknownMarket(String),
}

impl ChannelError {
    pub fn code(&self) -> &'static str {
        match self {
            ChannelError::Unknown(_) => "unknown_channel",
            ChannelError::UnknownMarket(_) => "unknown_market",
        }
    }

    pub fn channel(&self) -> &str {
        match self {
            ChannelError::Unknown(name) | ChannelError::UnknownMarket(name) => name,
        }
    }

    pub fn detail(&self) -> String {
        match self {
            ChannelError::Unknown(name) => {
                format!(
                    "{name:?} is not a channel; use prices:<SYMBOL> (e.g. prices:BTC-USD), orders or notifications."
                )
            }
            ChannelError::UnknownMarket(name) => format!("{name:?} names no market (see GET /markets)."),
        }
    }
}

impl Channel {
    /// Parses a channel name; `is_market` says whether a symbol is a market.
    pub fn parse(name: &str, is_market: impl Fn(&Symbol) -> bool) -> Result<Channel, ChannelError> {
        match name {
            "orders" => Ok(Channel::Orders),
            "notifications" => Ok(Channel::Notifications),
            _ => {
                let symbol = name.strip_prefix("prices:").ok_or_else(|| ChannelError::Unknown(name.to_owned()))?;
                match Symbol::parse(symbol) {
                    Ok(symbol) if is_market(&symbol) => Ok(Channel::Prices(symbol)),
                    _ => Err(ChannelError::UnknownMarket(name.to_owned())),
                }
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            Channel::Prices(symbol) => format!("prices:{symbol}"),
            Channel::Orders => "orders".to_owned(),
            Channel::Notifications => "notifications".to_owned(),
        }
    }

    /// The kind of channel, a bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Channel::Prices(_) => "prices",
            Channel::Orders => "orders",
            Channel::Notifications => "notifications",
        }
    }
}

/// A data frame without its `seq`: serialized once per message, then numbered per connection
/// at the moment it is written (so `seq` has no gaps whatever the connection skips).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFrame {
    pub channel: Channel,
    /// `{"channel":"…","seq":`
    head: String,
    /// `,"data":…}`
    tail: String,
}

impl DataFrame {
    pub fn new(channel: Channel, data: &impl Serialize) -> Result<DataFrame, serde_json::Error> {
        let head = format!("{{\"channel\":{},\"seq\":", serde_json::to_string(&channel.name())?);
        let tail = format!(",\"data\":{}}}", serde_json::to_string(data)?);
        Ok(DataFrame { channel, head, tail })
    }

    /// The frame's text with its number on this connection.
    pub fn text(&self, seq: u64) -> String {
        let mut text = String::with_capacity(self.head.len() + 20 + self.tail.len());
        text.push_str(&self.head);
        text.push_str(&seq.to_string());
        text.push_str(&self.tail);
        text
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn btc_only(symbol: &Symbol) -> bool {
        symbol.to_string() == "BTC-USD"
    }

    #[test]
    fn client_frames_of_the_contract_parse_and_anything_else_is_refused() {
        assert_eq!(ClientFrame::parse(r#"{"op":"auth","token":"abc"}"#), Ok(ClientFrame::Auth { token: "abc".into() }));
        assert_eq!(
            ClientFrame::parse(r#"{"op":"subscribe","channels":["prices:BTC-USD","orders","notifications"]}"#),
            Ok(ClientFrame::Subscribe {
                channels: vec!["prices:BTC-USD".into(), "orders".into(), "notifications".into()]
            })
        );
        assert_eq!(
            ClientFrame::parse(r#"{"op":"unsubscribe","channels":[]}"#),
            Ok(ClientFrame::Unsubscribe { channels: vec![] })
        );
        assert_eq!(ClientFrame::parse(r#"{"op":"pong"}"#), Ok(ClientFrame::Pong));
        assert_eq!(ClientFrame::parse(r#"{"op":"ping"}"#), Ok(ClientFrame::Ping));
        for bad in [
            "",
            "not json",
            "[]",
            r#"{"channels":["orders"]}"#,
            r#"{"op":"launch"}"#,
            r#"{"op":"auth"}"#,
            r#"{"op":"auth","token":1}"#,
            r#"{"op":"subscribe","channels":"orders"}"#,
            r#"{"op":"subscribe","channels":["orders"],"extra":true}"#,
        ] {
            let err = ClientFrame::parse(bad).expect_err(bad);
            assert!(err.contains("Not a valid frame"), "{err}");
        }
    }

    #[test]
    fn channels_are_prices_of_a_market_orders_or_notifications() {
        assert_eq!(
            Channel::parse("prices:BTC-USD", btc_only),
            Ok(Channel::Prices(Symbol::parse("BTC-USD").expect("symbol")))
        );
        assert_eq!(Channel::parse("orders", btc_only), Ok(Channel::Orders));
        assert_eq!(Channel::parse("notifications", btc_only), Ok(Channel::Notifications));
        for (name, code) in [
            ("prices:ETH-USD", "unknown_market"),
            ("prices:btc-usd", "unknown_market"),
            ("prices:", "unknown_market"),
            ("trades", "unknown_channel"),
            ("orders:someone-else", "unknown_channel"),
            ("", "unknown_channel"),
        ] {
            let err = Channel::parse(name, btc_only).expect_err(name);
            assert_eq!((err.code(), err.channel()), (code, name));
        }
        for channel in [Channel::Orders, Channel::Notifications, Channel::Prices(Symbol::parse("BTC-USD").expect("s"))]
        {
            assert_eq!(Channel::parse(&channel.name(), btc_only), Ok(channel));
        }
    }

    #[test]
    fn a_data_frame_is_numbered_when_written() {
        let frame = DataFrame::new(Channel::Orders, &json!({"id": "x", "type": "order.filled"})).expect("frame");
        let one: Value = serde_json::from_str(&frame.text(1)).expect("json");
        let two: Value = serde_json::from_str(&frame.text(2)).expect("json");
        assert_eq!(one, json!({"channel": "orders", "seq": 1, "data": {"id": "x", "type": "order.filled"}}));
        assert_eq!(two["seq"], 2);
        let price = DataFrame::new(Channel::Prices(Symbol::parse("BTC-USD").expect("s")), &json!({})).expect("frame");
        assert_eq!(serde_json::from_str::<Value>(&price.text(u64::MAX)).expect("json")["channel"], "prices:BTC-USD");
    }

    #[test]
    fn control_frames_have_the_documented_shape() {
        let channels = vec!["orders".to_owned()];
        let as_json = |f: ServerFrame| serde_json::from_str::<Value>(&f.to_text()).expect("json");
        assert_eq!(as_json(ServerFrame::Ping), json!({"op": "ping"}));
        assert_eq!(
            as_json(ServerFrame::Subscribed { channels: &channels }),
            json!({"op": "subscribed", "channels": ["orders"]})
        );
        assert_eq!(
            as_json(ServerFrame::Error { code: "unknown_channel", detail: "d", channel: Some("x") }),
            json!({"op": "error", "code": "unknown_channel", "detail": "d", "channel": "x"})
        );
        assert_eq!(
            as_json(ServerFrame::Error { code: "malformed_frame", detail: "d", channel: None }),
            json!({"op": "error", "code": "malformed_frame", "detail": "d"})
        );
    }
}
