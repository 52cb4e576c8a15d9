//! Grant name patterns: `*` matches any run of characters, `/` included, and `?` exactly one.
//! Everything else matches itself; secret names cannot contain `*` or `?`, so a secret's exact
//! name is a pattern that matches only that secret.

/// Whether `pattern` matches all of `name`. Iterative with one backtrack point, so a pattern
/// of many stars costs linear time, not exponential.
pub fn matches(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == '?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                // Let the last star swallow one more character and try again.
                Some((star_p, star_n)) => {
                    p = star_p + 1;
                    n = star_n + 1;
                    star = Some((star_p, star_n + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// Whether the pattern holds a wildcard, i.e. may cover secrets other than one name.
pub fn has_wildcard(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn stars_cross_slashes_and_question_marks_take_one() {
        assert!(matches("prod/stripe/*", "prod/stripe/key"));
        assert!(matches("prod/stripe/*", "prod/stripe/eu/key"));
        assert!(matches("prod/stripe/*", "prod/stripe/"));
        assert!(!matches("prod/stripe/*", "prod/stripes"));
        assert!(matches("*", "anything/at/all"));
        assert!(matches("prod/*/db", "prod/payments/eu/db"));
        assert!(!matches("prod/*/db", "prod/payments/dbx"));
        assert!(matches("db?", "db1"));
        assert!(!matches("db?", "db"));
        assert!(!matches("db?", "db12"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
        assert!(matches("exact/name", "exact/name"));
        assert!(!matches("exact/name", "exact/names"));
        assert!(matches("**", ""));
    }

    #[test]
    fn many_stars_do_not_backtrack_exponentially() {
        // A naive recursive matcher would not finish this in a lifetime.
        let pattern = "*a".repeat(50);
        assert!(!matches(&pattern, &("a".repeat(49) + "b")));
        assert!(matches(&pattern, &"a".repeat(50)));
    }
}
