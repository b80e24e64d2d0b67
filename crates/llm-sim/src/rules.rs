//! The simulator's deterministic "model": plain keyword rules that turn a support
//! ticket's text into the default pipeline's enrichment. Same text, same answer.

use serde_json::{Value, json};

const CATEGORIES: &[(&str, &[&str])] = &[
    (
        "billing",
        &[
            "invoice",
            "charge",
            "charged",
            "refund",
            "payment",
            "bill",
            "billing",
            "price",
            "subscription",
            "rechnung",
            "factura",
            "facture",
        ],
    ),
    (
        "shipping",
        &[
            "delivery",
            "shipping",
            "shipment",
            "package",
            "parcel",
            "tracking",
            "courier",
            "arrived",
            "lieferung",
            "envío",
            "livraison",
        ],
    ),
    (
        "account",
        &[
            "password",
            "login",
            "log in",
            "sign in",
            "account",
            "username",
            "email address",
            "2fa",
            "konto",
            "cuenta",
            "compte",
        ],
    ),
    (
        "technical",
        &[
            "error",
            "crash",
            "crashes",
            "bug",
            "broken",
            "not working",
            "timeout",
            "slow",
            "fails",
            "exception",
            "fehler",
            "erreur",
        ],
    ),
];

const NEGATIVE: &[&str] = &[
    "angry",
    "terrible",
    "awful",
    "worst",
    "bad",
    "broken",
    "unacceptable",
    "frustrated",
    "frustrating",
    "disappointed",
    "annoyed",
    "useless",
    "never",
    "still",
    "again",
    "wrong",
    "problem",
    "fails",
    "crash",
];
const POSITIVE: &[&str] =
    &["thanks", "thank you", "great", "love", "happy", "awesome", "excellent", "appreciate", "perfect", "wonderful"];
const URGENT: &[&str] = &["urgent", "asap", "immediately", "emergency", "right now", "dringend", "urgente"];

const LANGUAGES: &[(&str, &[&str])] = &[
    ("en", &["the", "and", "is", "my", "not", "with", "you", "please", "have", "was"]),
    ("de", &["der", "die", "das", "und", "ist", "nicht", "mein", "ich", "bitte", "mit"]),
    ("fr", &["le", "la", "les", "et", "est", "pas", "mon", "je", "avec", "merci"]),
    ("es", &["el", "los", "las", "y", "es", "no", "mi", "por", "con", "gracias"]),
    ("it", &["il", "gli", "e", "non", "mio", "per", "con", "grazie", "sono", "della"]),
    ("pt", &["o", "os", "e", "não", "meu", "com", "obrigado", "para", "uma", "está"]),
    ("nl", &["de", "het", "en", "is", "niet", "mijn", "ik", "met", "een", "bedankt"]),
];

const MAX_SUMMARY_CHARS: usize = 200;
const MAX_TAGS: usize = 6;

/// The enrichment of one ticket text: category, sentiment, priority, language, summary, tags.
pub fn enrich(text: &str) -> Value {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower.split(|c: char| !c.is_alphanumeric() && c != '\'').filter(|w| !w.is_empty()).collect();
    let has = |needle: &str| {
        if needle.contains(' ') { lower.contains(needle) } else { words.contains(&needle) }
    };

    let mut tags: Vec<String> = Vec::new();
    let mut category = "other";
    for (name, keywords) in CATEGORIES {
        let hits: Vec<&str> = keywords.iter().copied().filter(|k| has(k)).collect();
        if !hits.is_empty() {
            if category == "other" {
                category = name;
            }
            tags.extend(hits.iter().map(|h| h.replace(' ', "-")));
        }
    }

    let negative = NEGATIVE.iter().filter(|k| has(k)).count();
    let positive = POSITIVE.iter().filter(|k| has(k)).count();
    let sentiment = match negative.cmp(&positive) {
        std::cmp::Ordering::Greater => "negative",
        std::cmp::Ordering::Less => "positive",
        std::cmp::Ordering::Equal => "neutral",
    };

    let urgent = URGENT.iter().any(|k| has(k));
    let priority = if urgent {
        "urgent"
    } else if sentiment == "negative" && matches!(category, "technical" | "billing") {
        "high"
    } else if sentiment == "negative" || category != "other" {
        "medium"
    } else {
        "low"
    };
    if urgent {
        tags.push("urgent".into());
    }

    let language = LANGUAGES
        .iter()
        .map(|(code, stop)| (code, stop.iter().filter(|s| words.contains(s)).count()))
        .fold(("en", 0usize), |best, (code, n)| if n > best.1 { (*code, n) } else { best });

    tags.insert(0, category.to_string());
    let mut seen = std::collections::HashSet::new();
    tags.retain(|t| seen.insert(t.clone()));
    tags.truncate(MAX_TAGS);

    json!({
        "category": category,
        "sentiment": sentiment,
        "priority": priority,
        "language": language.0,
        "summary": summarise(text),
        "tags": tags,
    })
}

/// "<subject>: <first sentence of the body>" when the text starts with a `Subject:` line,
/// else the first sentence; whitespace collapsed, cut to 200 characters.
fn summarise(text: &str) -> String {
    let trimmed = text.trim_start();
    if let Some(rest) = trimmed.strip_prefix("Subject:") {
        let (subject, body) = rest.split_once('\n').unwrap_or((rest, ""));
        let subject = subject.trim().trim_end_matches(['.', '!', '?', ':']);
        let sentence = first_sentence(body);
        let joined = if sentence.is_empty() { subject.to_string() } else { format!("{subject}: {sentence}") };
        return cut(&joined);
    }
    cut(&first_sentence(text))
}

fn first_sentence(text: &str) -> String {
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let first = match collapsed.find(['.', '!', '?']) {
        Some(i) => &collapsed[..=i],
        None => collapsed.as_str(),
    };
    first.trim().to_string()
}

fn cut(trimmed: &str) -> String {
    if trimmed.chars().count() <= MAX_SUMMARY_CHARS {
        return trimmed.to_string();
    }
    let mut cut: String = trimmed.chars().take(MAX_SUMMARY_CHARS - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_complaint() {
        let v = enrich(
            "Subject: Charged twice\n\nI was charged twice for my subscription, this is unacceptable. Please refund.",
        );
        assert_eq!(v["category"], "billing");
        assert_eq!(v["sentiment"], "negative");
        assert_eq!(v["priority"], "high");
        assert_eq!(v["language"], "en");
        assert_eq!(v["summary"], "Charged twice: I was charged twice for my subscription, this is unacceptable.");
        assert_eq!(v["tags"][0], "billing");
    }

    #[test]
    fn urgent_german_shipping() {
        let v = enrich("Die Lieferung ist nicht angekommen, bitte dringend prüfen");
        assert_eq!(v["category"], "shipping");
        assert_eq!(v["priority"], "urgent");
        assert_eq!(v["language"], "de");
    }

    #[test]
    fn friendly_note_is_low_priority_other() {
        let v = enrich("Just wanted to say thanks, the new dashboard is great");
        assert_eq!(v["category"], "other");
        assert_eq!(v["sentiment"], "positive");
        assert_eq!(v["priority"], "low");
    }

    #[test]
    fn summary_is_at_most_200_characters_and_deterministic() {
        let long = "ü".repeat(500);
        let v = enrich(&long);
        assert_eq!(v["summary"].as_str().unwrap().chars().count(), 200);
        assert_eq!(enrich(&long), v);
    }
}
