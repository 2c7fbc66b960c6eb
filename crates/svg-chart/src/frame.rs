//! Where a chart draws: its size and the plot inside its margins, and coordinates from fractions
//! of the plot.

/// A chart's size and the margins around its plot (room for the labels), in SVG units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Frame {
    pub width: f64,
    pub height: f64,
    pub left: f64,
    pub right: f64,
    pub top: f64,
    pub bottom: f64,
}

impl Frame {
    /// The plot's right edge.
    pub fn plot_right(&self) -> f64 {
        self.width - self.right
    }

    /// The plot's bottom edge.
    pub fn plot_bottom(&self) -> f64 {
        self.height - self.bottom
    }

    pub fn plot_width(&self) -> f64 {
        self.width - self.left - self.right
    }

    pub fn plot_height(&self) -> f64 {
        self.height - self.top - self.bottom
    }

    /// The x of a fraction of the plot's width: 0 its left edge, 1 its right; clamped to it.
    pub fn x(&self, fraction: f64) -> f64 {
        self.left + fraction.clamp(0.0, 1.0) * self.plot_width()
    }

    /// The y of a fraction of the plot's height: 0 its bottom edge, 1 its top (SVG's y runs
    /// down); clamped to it.
    pub fn y(&self, fraction: f64) -> f64 {
        self.top + (1.0 - fraction.clamp(0.0, 1.0)) * self.plot_height()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Frame = Frame { width: 720.0, height: 200.0, left: 58.0, right: 10.0, top: 8.0, bottom: 22.0 };

    #[test]
    fn fractions_land_inside_the_margins() {
        assert_eq!((FRAME.x(0.0), FRAME.x(1.0), FRAME.x(0.5)), (58.0, 710.0, 384.0));
        assert_eq!((FRAME.y(0.0), FRAME.y(1.0)), (178.0, 8.0), "up is a smaller y");
        assert_eq!((FRAME.x(-3.0), FRAME.x(7.0)), (58.0, 710.0), "clamped to the plot");
        assert_eq!((FRAME.y(-3.0), FRAME.y(7.0)), (178.0, 8.0));
        assert_eq!((FRAME.plot_right(), FRAME.plot_bottom()), (710.0, 178.0));
        assert_eq!((FRAME.plot_width(), FRAME.plot_height()), (652.0, 170.0));
    }
}
