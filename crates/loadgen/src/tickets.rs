//! Deterministic support tickets: the same (run, n) always gives the same ticket.

use serde_json::json;

const SUBJECTS_AND_BODIES: &[(&str, &str)] = &[
    (
        "Charged twice",
        "I was charged twice for my subscription this month. This is unacceptable, please refund the second payment.",
    ),
    ("Invoice question", "Could you send me the invoice for order {n}? Thanks, I appreciate the quick help."),
    (
        "App crashes on start",
        "The app crashes every time I open it since the last update. Error code 0x{n}. Still broken after reinstalling.",
    ),
    (
        "Slow dashboard",
        "The dashboard is very slow and sometimes shows a timeout error. Not urgent, just wanted you to know.",
    ),
    (
        "Cannot log in",
        "I forgot my password and the reset email never arrives. Please help, I need my account immediately.",
    ),
    ("Change email address", "Please change the email address on my account to the new one I sent earlier."),
    (
        "Where is my package?",
        "My package was supposed to arrive on Monday but the tracking page has not changed for a week. Very frustrated.",
    ),
    (
        "Delivery to wrong address",
        "The courier delivered the parcel to the wrong address. Urgent: it contains medication.",
    ),
    ("Great service", "Just wanted to say thanks, the support team was excellent and the new release is great."),
    (
        "Rechnung fehlt",
        "Ich habe keine Rechnung für meine Bestellung {n} bekommen. Bitte schicken Sie mir die Rechnung.",
    ),
    ("Livraison en retard", "Ma livraison n'est pas arrivée et le suivi ne marche pas. Merci de vérifier."),
    ("Cuenta bloqueada", "Mi cuenta está bloqueada y no puedo entrar. Por favor ayuda, gracias."),
    ("Feature idea", "It would be nice to export reports as CSV. Keep up the good work."),
];

const CUSTOMERS: &[&str] = &["acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka"];

/// A support ticket as it sits on the source topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub id: String,
    pub customer: String,
    pub subject: String,
    pub body: String,
    pub created_at: String,
}

fn mix(mut x: u64) -> u64 {
    // SplitMix64: spreads consecutive n over the templates.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

pub fn ticket(run: &str, n: usize) -> Ticket {
    let h = mix(n as u64);
    let (subject, body) = SUBJECTS_AND_BODIES[(h % SUBJECTS_AND_BODIES.len() as u64) as usize];
    let customer = CUSTOMERS[((h >> 16) % CUSTOMERS.len() as u64) as usize];
    let secs = n % 86_400;
    Ticket {
        id: format!("{run}-{n:06}"),
        customer: format!("{customer}-{}", (h >> 32) % 50),
        subject: subject.to_string(),
        body: body.replace("{n}", &n.to_string()),
        created_at: format!("2026-11-27T{:02}:{:02}:{:02}Z", secs / 3600, (secs / 60) % 60, secs % 60),
    }
}

impl Ticket {
    pub fn to_json(&self) -> Vec<u8> {
        json!({
            "id": self.id,
            "customer": self.customer,
            "subject": self.subject,
            "body": self.body,
            "created_at": self.created_at,
        })
        .to_string()
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_deterministic_and_distinct() {
        assert_eq!(ticket("r", 7), ticket("r", 7));
        assert_ne!(ticket("r", 7).id, ticket("r", 8).id);
        let v: serde_json::Value = serde_json::from_slice(&ticket("r", 1).to_json()).unwrap();
        assert_eq!(v["id"], "r-000001");
        let subjects: std::collections::HashSet<_> = (0..200).map(|n| ticket("r", n).subject).collect();
        assert!(subjects.len() > 8, "templates are spread: {}", subjects.len());
    }
}
