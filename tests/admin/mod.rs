//! The admin listener: the console in a real browser.

mod console;
