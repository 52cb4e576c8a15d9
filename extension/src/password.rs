//! `get_random_password`: characters drawn uniformly from the OS CSPRNG.

use crate::errors::{Error, Result};
use rand::rngs::OsRng;
use rand::seq::SliceRandom;
use rand::Rng;

pub const MAX_PASSWORD_LENGTH: i32 = 4096;
/// As AWS Secrets Manager has it; more could only repeat characters.
pub const MAX_EXCLUDED_CHARACTERS: usize = 4096;
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

pub struct PasswordRules<'a> {
    pub length: i32,
    pub exclude_characters: &'a str,
    pub exclude_numbers: bool,
    pub exclude_punctuation: bool,
    pub exclude_uppercase: bool,
    pub exclude_lowercase: bool,
    pub include_space: bool,
    pub require_each_included_type: bool,
}

pub fn random_password(rules: &PasswordRules) -> Result<String> {
    if !(1..=MAX_PASSWORD_LENGTH).contains(&rules.length) {
        return Err(Error::InvalidParameter(format!(
            "password_length must be between 1 and {MAX_PASSWORD_LENGTH}, not {}",
            rules.length
        )));
    }
    let excluded = rules.exclude_characters.chars().count();
    if excluded > MAX_EXCLUDED_CHARACTERS {
        return Err(Error::InvalidParameter(format!(
            "exclude_characters is at most {MAX_EXCLUDED_CHARACTERS} characters, not {excluded}"
        )));
    }
    let classes: Vec<Vec<char>> = [
        (!rules.exclude_lowercase, ('a'..='z').collect::<String>()),
        (!rules.exclude_uppercase, ('A'..='Z').collect()),
        (!rules.exclude_numbers, ('0'..='9').collect()),
        (!rules.exclude_punctuation, PUNCTUATION.to_string()),
        (rules.include_space, " ".to_string()),
    ]
    .into_iter()
    .filter(|(included, _)| *included)
    .map(|(_, chars)| {
        chars
            .chars()
            .filter(|c| !rules.exclude_characters.contains(*c))
            .collect()
    })
    .filter(|chars: &Vec<char>| !chars.is_empty())
    .collect();
    let alphabet: Vec<char> = classes.concat();
    if alphabet.is_empty() {
        return Err(Error::InvalidParameter(
            "the exclusions leave no character to build a password from".into(),
        ));
    }
    let length = rules.length as usize;
    let mut password: Vec<char> = Vec::with_capacity(length);
    if rules.require_each_included_type {
        if length < classes.len() {
            return Err(Error::InvalidParameter(format!(
                "password_length {length} is too short to include each of the {} character types",
                classes.len()
            )));
        }
        password.extend(
            classes
                .iter()
                .map(|class| class[OsRng.gen_range(0..class.len())]),
        );
    }
    while password.len() < length {
        password.push(alphabet[OsRng.gen_range(0..alphabet.len())]);
    }
    password.shuffle(&mut OsRng);
    Ok(password.into_iter().collect())
}
