//! Inline SVG charts written as text, for pages that fetch nothing: the agent's status page and
//! calibrate's `report.html` both draw their charts with these pieces, so that a fix to an axis,
//! a scale or the escaping of outside text reaches both. Pure: it writes into a `String` and
//! does no IO.
//!
//! A chart is drawn on a `Frame` (its size, and the margins around the plot that hold the
//! labels); a scale (`Linear`, `Log`) turns a value into a fraction of the plot, and the frame
//! turns the fraction into a coordinate; the writers in `element` put the SVG elements down.
//!
//! How an element looks is the caller's: each writer takes `attrs`, markup written as given
//! right after the element's name (` class="grid"` for a page with a stylesheet,
//! ` stroke="#ddd"` for a file that carries its colours inline). Text from outside never goes
//! into `attrs` unescaped; the writers escape the text and titles they are given.

pub mod element;
mod frame;
mod scale;
mod text;

pub use element::{Anchor, TickStyle};
pub use frame::Frame;
pub use scale::{Linear, Log, nice_ceiling};
pub use text::{escape, short};
