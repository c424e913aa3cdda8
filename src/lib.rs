//! vmkit umbrella
