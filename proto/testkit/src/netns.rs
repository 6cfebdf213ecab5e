//! netns fixtures.
