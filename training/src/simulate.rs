//! A clickstream simulator: histories for a mixed population whose outcomes follow from
//! their behavior, so models trained on them learn real structure.
//!
//! Every person has a persona and latent traits (visit rate, purchase intent, favorite
//! category, email engagement). Visits, carts, purchases and emails are drawn from those
//! traits and from the person's own recent behavior: an abandoned cart makes a return visit
//! and a purchase within the day likely; a drifting customer's visit rate decays until they
//! stop coming. Deterministic for a given seed.
//!
//! Identities are those of a real shop: a quarter of the people never log in and stay
//! anonymous visitors (one device id). The others are known users. Most of them browse
//! anonymously on a device until they log in there — at a session of their own or when they
//! check out — and the event of the login carries both ids; from then on that device sends
//! the user id. Some use a second or third device, each starting anonymous again. Emails
//! reach known users under their user id. So the server stitches these histories, and the
//! trainer has to stitch them the same way.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, LogNormal, Poisson};

use nudge::event::{Event, EventKind, PersonKey, Properties};
use nudge::time::{Time, DAY_MS, HOUR_MS, MINUTE_MS};

/// The kinds of people in the population.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persona {
    /// Visits often, buys regularly, reads emails.
    EngagedShopper,
    /// Visits, looks around, rarely buys.
    Browser,
    /// Was a customer; visits less and less until they stop.
    Drifting,
    /// Arrives partway through; most leave after a visit or two, some stay.
    NewVisitor,
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub people: usize,
    pub days: i64,
    /// The first instant of the simulation.
    pub start: Time,
    pub seed: u64,
}

/// One person's simulated history, in time order.
#[derive(Clone, Debug)]
pub struct History {
    /// Who the person is in the end: their user id, or the one anonymous id of a person
    /// who never logged in.
    pub person: PersonKey,
    /// The anonymous ids of the person's devices.
    pub devices: Vec<PersonKey>,
    pub persona: Persona,
    pub events: Vec<Event>,
}

impl History {
    /// Every id the person's events carry: the user id (if any) and every device's id.
    pub fn keys(&self) -> impl Iterator<Item = &PersonKey> {
        std::iter::once(&self.person).chain(self.devices.iter().filter(|d| **d != self.person))
    }

    /// The events at which the person logged in on a device (they carry both ids).
    pub fn logins(&self) -> impl Iterator<Item = &Event> {
        self.events.iter().filter(|e| e.linked.is_some())
    }
}

/// One device of a person: its anonymous id and whether the person has logged in on it.
struct Device {
    anonymous: String,
    /// The first day the device is used.
    first_day: i64,
    logged_in: bool,
    /// At which of the device's sessions the person logs in, unless a checkout comes first.
    login_session: u32,
    sessions: u32,
}

const CATEGORIES: &[&str] = &[
    "shoes",
    "outerwear",
    "dresses",
    "bags",
    "beauty",
    "home",
    "kitchen",
    "electronics",
    "toys",
    "sports",
];
const PRODUCTS_PER_CATEGORY: u32 = 40;

struct Traits {
    /// Expected sessions per day at the start.
    visit_rate: f64,
    /// Days over which the visit rate halves (infinite for stable people).
    half_life_days: f64,
    /// The day the person first appears.
    first_day: i64,
    /// The chance that a product view leads to an add-to-cart.
    cart_propensity: f64,
    /// The chance that a cart is bought in the session it was filled.
    buy_now: f64,
    /// The chance that an abandoned cart is bought on a return visit within a day.
    buy_later: f64,
    /// Pages per session, as a mean.
    depth: f64,
    favorite: usize,
    email_open: f64,
    /// After the first visit, a new visitor who does not stay stops here.
    leaves_after_sessions: Option<u32>,
}

fn traits(persona: Persona, rng: &mut ChaCha8Rng, days: i64) -> Traits {
    let favorite = rng.random_range(0..CATEGORIES.len());
    match persona {
        Persona::EngagedShopper => Traits {
            visit_rate: rng.random_range(0.15..0.5),
            half_life_days: f64::INFINITY,
            first_day: 0,
            cart_propensity: rng.random_range(0.08..0.2),
            buy_now: rng.random_range(0.3..0.6),
            buy_later: rng.random_range(0.3..0.6),
            depth: rng.random_range(4.0..9.0),
            favorite,
            email_open: rng.random_range(0.3..0.7),
            leaves_after_sessions: None,
        },
        Persona::Browser => Traits {
            visit_rate: rng.random_range(0.05..0.35),
            half_life_days: f64::INFINITY,
            first_day: 0,
            cart_propensity: rng.random_range(0.01..0.06),
            buy_now: rng.random_range(0.02..0.15),
            buy_later: rng.random_range(0.05..0.2),
            depth: rng.random_range(1.5..6.0),
            favorite,
            email_open: rng.random_range(0.05..0.3),
            leaves_after_sessions: None,
        },
        Persona::Drifting => Traits {
            visit_rate: rng.random_range(0.2..0.6),
            half_life_days: rng.random_range(5.0..25.0),
            first_day: -rng.random_range(0..30),
            cart_propensity: rng.random_range(0.04..0.12),
            buy_now: rng.random_range(0.15..0.4),
            buy_later: rng.random_range(0.1..0.3),
            depth: rng.random_range(2.0..8.0),
            favorite,
            email_open: rng.random_range(0.05..0.4),
            leaves_after_sessions: None,
        },
        Persona::NewVisitor => {
            let stays = rng.random_bool(0.3);
            Traits {
                visit_rate: rng.random_range(0.1..0.5),
                half_life_days: if stays { f64::INFINITY } else { 3.0 },
                first_day: rng.random_range(0..days.max(1)),
                cart_propensity: rng.random_range(0.02..0.12),
                buy_now: rng.random_range(0.1..0.4),
                buy_later: rng.random_range(0.1..0.4),
                depth: rng.random_range(2.0..7.0),
                favorite,
                email_open: rng.random_range(0.1..0.4),
                leaves_after_sessions: (!stays).then(|| rng.random_range(1..3)),
            }
        }
    }
}

fn persona_for(rng: &mut ChaCha8Rng) -> Persona {
    match rng.random_range(0..100) {
        0..25 => Persona::EngagedShopper,
        25..55 => Persona::Browser,
        55..75 => Persona::Drifting,
        _ => Persona::NewVisitor,
    }
}

/// Simulates the population. Each person gets their own random stream derived from the
/// seed, so adding people does not change the earlier ones.
pub fn simulate(config: &SimConfig) -> Vec<History> {
    (0..config.people)
        .map(|i| simulate_person(config, i as u64))
        .collect()
}

/// Simulates person `index`.
pub fn simulate_person(config: &SimConfig, index: u64) -> History {
    let mut rng =
        ChaCha8Rng::seed_from_u64(config.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let persona = persona_for(&mut rng);
    let t = traits(persona, &mut rng, config.days);
    let user = rng.random_bool(0.75).then(|| format!("user-{index}"));
    // Known users: 40% are logged in on their first device from the start (a returning
    // customer's cookie), the others browse anonymously there until they log in.
    let mut devices = vec![Device {
        anonymous: format!("anon-{index}-0"),
        first_day: t.first_day,
        logged_in: user.is_some() && rng.random_bool(0.4),
        login_session: rng.random_range(0..4),
        sessions: 0,
    }];
    if user.is_some() {
        let extra = match rng.random_range(0..100) {
            0..25 => 1,
            25..35 => 2,
            _ => 0,
        };
        for d in 1..=extra {
            devices.push(Device {
                anonymous: format!("anon-{index}-{d}"),
                // Within two weeks of the first visit.
                first_day: t.first_day.max(0) + rng.random_range(0..14),
                logged_in: false,
                login_session: rng.random_range(0..2),
                sessions: 0,
            });
        }
    }
    let mut sim = PersonSim {
        rng,
        index,
        user: user.clone(),
        devices,
        device: 0,
        login_pending: false,
        events: Vec::new(),
        next_id: 0,
    };
    let end = config.start.plus_ms(config.days * DAY_MS);
    let mut sessions = 0u32;
    let mut day = t.first_day;
    // A return visit to buy an abandoned cart, if one is coming.
    let mut comeback: Option<Time> = None;
    while day < config.days {
        let age = (day - t.first_day) as f64;
        let rate = t.visit_rate * 0.5f64.powf(age / t.half_life_days);
        let visits = Poisson::new(rate.max(1e-9))
            .map(|p| p.sample(&mut sim.rng) as u32)
            .unwrap_or(0);
        let visits = if day == t.first_day.max(0) && persona == Persona::NewVisitor {
            visits.max(1)
        } else {
            visits
        };
        let day_start = config.start.plus_ms(day * DAY_MS);
        let mut starts: Vec<Time> = (0..visits)
            .map(|_| {
                day_start.plus_ms(sim.visit_hour() * HOUR_MS + sim.rng.random_range(0..HOUR_MS))
            })
            .collect();
        if let Some(at) = comeback.filter(|at| at.day() == day_start.day()) {
            starts.push(at);
        }
        starts.sort();
        for start in starts {
            if start >= end || sim.last_time().is_some_and(|l| start <= l) {
                continue;
            }
            if t.leaves_after_sessions.is_some_and(|n| sessions >= n) {
                break;
            }
            let buying_back = comeback == Some(start);
            comeback = None;
            sim.pick_device(day);
            let abandoned = sim.session(start, &t, buying_back);
            sessions += 1;
            if abandoned && sim.rng.random_bool(t.buy_later) {
                let delay = sim.rng.random_range(HOUR_MS..20 * HOUR_MS);
                comeback = Some(sim.last_time().unwrap_or(start).plus_ms(delay));
            }
        }
        // Weekly newsletter for known users who have visited.
        if day >= 0
            && day % 7 == 3
            && sessions > 0
            && sim.user.is_some()
            && sim.rng.random_bool(t.email_open)
        {
            let at = day_start.plus_ms(9 * HOUR_MS + sim.rng.random_range(0..8 * HOUR_MS));
            if at < end && sim.last_time().is_none_or(|l| at > l) {
                sim.push_email(at, EventKind::EmailOpen);
                if sim.rng.random_bool(0.35) {
                    let click = at.plus_ms(sim.rng.random_range(MINUTE_MS..10 * MINUTE_MS));
                    sim.push_email(click, EventKind::EmailClick);
                    // A click brings the person to the site.
                    if click.plus_ms(2 * MINUTE_MS) < end {
                        sim.pick_device(day);
                        sim.session(click.plus_ms(MINUTE_MS), &t, false);
                        sessions += 1;
                    }
                }
            }
        }
        day += 1;
    }
    History {
        person: match &sim.user {
            Some(user) => PersonKey::User(user.clone()),
            None => PersonKey::Anonymous(sim.devices[0].anonymous.clone()),
        },
        devices: sim
            .devices
            .iter()
            .map(|d| PersonKey::Anonymous(d.anonymous.clone()))
            .collect(),
        persona,
        events: sim.events,
    }
}

struct PersonSim {
    rng: ChaCha8Rng,
    index: u64,
    /// The user id of a known user.
    user: Option<String>,
    devices: Vec<Device>,
    /// The device of the current session.
    device: usize,
    /// The next browsing event is the login: it carries both ids.
    login_pending: bool,
    events: Vec<Event>,
    next_id: u64,
}

impl PersonSim {
    /// Chooses the device of a session starting on `day`: the first device more often
    /// than the others in use by then.
    fn pick_device(&mut self, day: i64) {
        let in_use: Vec<usize> = (0..self.devices.len())
            .filter(|&d| self.devices[d].first_day <= day)
            .collect();
        self.device = if in_use.len() > 1 && self.rng.random_bool(0.5) {
            in_use[self.rng.random_range(1..in_use.len())]
        } else {
            0
        };
        self.login_pending = false;
    }

    /// Who the events of the current device belong to, as (person, linked): the user once
    /// logged in there; at the login both ids; else the device's anonymous id.
    fn identity(&mut self) -> (PersonKey, Option<PersonKey>) {
        let device = &mut self.devices[self.device];
        let anonymous = PersonKey::Anonymous(device.anonymous.clone());
        match &self.user {
            Some(user) if device.logged_in => (PersonKey::User(user.clone()), None),
            Some(user) if self.login_pending => {
                device.logged_in = true;
                self.login_pending = false;
                (PersonKey::User(user.clone()), Some(anonymous))
            }
            _ => (anonymous, None),
        }
    }

    /// Whether a known user is not yet logged in on the current device.
    fn anonymous_user(&self) -> bool {
        self.user.is_some() && !self.devices[self.device].logged_in
    }
    fn last_time(&self) -> Option<Time> {
        self.events.last().map(|e| e.time)
    }

    /// Hours into the day a visit starts: evenings are busiest.
    fn visit_hour(&mut self) -> i64 {
        const WEIGHTS: [u32; 24] = [
            1, 1, 1, 1, 1, 1, 2, 3, 4, 4, 4, 5, 6, 5, 4, 4, 5, 6, 8, 9, 9, 7, 4, 2,
        ];
        let total: u32 = WEIGHTS.iter().sum();
        let mut pick = self.rng.random_range(0..total);
        for (hour, w) in WEIGHTS.iter().enumerate() {
            if pick < *w {
                return hour as i64;
            }
            pick -= w;
        }
        23
    }

    /// An email event: the address belongs to the user, whatever the device.
    fn push_email(&mut self, time: Time, kind: EventKind) {
        let user = self.user.clone().expect("emails reach known users");
        self.push_as(
            PersonKey::User(user),
            None,
            time,
            kind,
            Properties::default(),
        );
    }

    fn push(&mut self, time: Time, kind: EventKind, properties: Properties) {
        let (person, linked) = self.identity();
        self.push_as(person, linked, time, kind, properties);
    }

    fn push_as(
        &mut self,
        person: PersonKey,
        linked: Option<PersonKey>,
        time: Time,
        kind: EventKind,
        properties: Properties,
    ) {
        self.next_id += 1;
        // Unique per person whatever id the event carries: the server's idempotency records
        // follow a merge.
        let id = format!("p{}-{}", self.index, self.next_id);
        self.events.push(Event {
            id,
            person,
            linked,
            kind,
            time,
            properties,
            attributes: Default::default(),
        });
    }

    /// One visit starting at `start`. Returns whether it left a cart unbought.
    fn session(&mut self, start: Time, t: &Traits, buying_back: bool) -> bool {
        let mut now = start;
        let mut cart_value = 0.0;
        let pages = 1 + Poisson::new(t.depth)
            .map(|p| p.sample(&mut self.rng) as u32)
            .unwrap_or(0);
        let step: Exp<f64> = Exp::new(1.0 / 45.0).expect("positive rate");
        let price: LogNormal<f64> = LogNormal::new(3.5, 0.6).expect("valid parameters");
        // The session in which a known user logs in on this device, and at which page.
        let device = &mut self.devices[self.device];
        let login_page =
            (self.user.is_some() && !device.logged_in && device.sessions >= device.login_session)
                .then(|| self.rng.random_range(0..pages));
        device.sessions += 1;
        for page in 0..pages {
            if page > 0 {
                now = now.plus_ms(((5.0 + step.sample(&mut self.rng)) * 1000.0) as i64);
            }
            if login_page == Some(page) {
                self.login_pending = true;
            }
            match self.rng.random_range(0..10) {
                0 => {
                    let query = format!("q{}", self.rng.random_range(0..50));
                    self.push(
                        now,
                        EventKind::Search,
                        Properties {
                            search_query: Some(query),
                            ..Properties::default()
                        },
                    );
                }
                1..=3 => self.push(
                    now,
                    EventKind::PageView,
                    Properties {
                        page: Some("/".to_owned()),
                        ..Properties::default()
                    },
                ),
                _ => {
                    let category = if self.rng.random_bool(0.7) {
                        t.favorite
                    } else {
                        self.rng.random_range(0..CATEGORIES.len())
                    };
                    let product = format!(
                        "{}-{}",
                        CATEGORIES[category],
                        self.rng.random_range(0..PRODUCTS_PER_CATEGORY)
                    );
                    let unit_price = (price.sample(&mut self.rng) * 100.0).round() / 100.0;
                    let dwell = self
                        .rng
                        .random_bool(0.7)
                        .then(|| (10.0 + step.sample(&mut self.rng) * 2.0).round());
                    self.push(
                        now,
                        EventKind::ProductView,
                        Properties {
                            product_id: Some(product.clone()),
                            category: Some(CATEGORIES[category].to_owned()),
                            price: Some(unit_price),
                            dwell_seconds: dwell,
                            ..Properties::default()
                        },
                    );
                    if let Some(d) = dwell {
                        now = now.plus_ms((d * 1000.0) as i64);
                    }
                    if self.rng.random_bool(t.cart_propensity) {
                        now = now.plus_ms(self.rng.random_range(2_000..20_000));
                        let quantity = if self.rng.random_bool(0.85) { 1 } else { 2 };
                        cart_value += unit_price * f64::from(quantity);
                        self.push(
                            now,
                            EventKind::AddToCart,
                            Properties {
                                product_id: Some(product),
                                category: Some(CATEGORIES[category].to_owned()),
                                price: Some(unit_price),
                                quantity: Some(quantity),
                                ..Properties::default()
                            },
                        );
                    }
                }
            }
        }
        if buying_back || cart_value > 0.0 {
            let buys = buying_back || self.rng.random_bool(t.buy_now);
            if buys || self.rng.random_bool(0.3) {
                now = now.plus_ms(self.rng.random_range(10_000..60_000));
                // Checkout asks a known user to log in.
                if self.anonymous_user() {
                    self.login_pending = true;
                }
                self.push(now, EventKind::CheckoutStarted, Properties::default());
            }
            if buys {
                now = now.plus_ms(self.rng.random_range(30_000..180_000));
                let value = if cart_value > 0.0 {
                    cart_value
                } else {
                    (price.sample(&mut self.rng) * 100.0).round() / 100.0
                };
                let order = format!("o-{}", self.next_id);
                self.push(
                    now,
                    EventKind::Purchase,
                    Properties {
                        order_value: Some((value * 100.0).round() / 100.0),
                        order_id: Some(order),
                        ..Properties::default()
                    },
                );
                return false;
            }
            return cart_value > 0.0;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SimConfig {
        SimConfig {
            people: 300,
            days: 60,
            start: Time(1_767_225_600_000), // 2026-01-01
            seed: 7,
        }
    }

    #[test]
    fn deterministic_and_time_ordered_and_valid() {
        let a = simulate(&config());
        let b = simulate(&config());
        assert_eq!(a.len(), 300);
        let events: usize = a.iter().map(|h| h.events.len()).sum();
        assert!(events > 3_000, "only {events} events");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.events, y.events);
            assert!(x.events.windows(2).all(|w| w[0].time <= w[1].time));
            let end = config().start.plus_ms(config().days * DAY_MS);
            for e in &x.events {
                e.validate(end, 400 * DAY_MS)
                    .expect("simulated events are valid");
            }
        }
    }

    #[test]
    fn known_users_browse_anonymously_then_log_in_on_each_device() {
        let people = simulate(&config());
        let (mut logged_in, mut several) = (0, 0);
        for h in &people {
            let logins: Vec<&Event> = h.logins().collect();
            for device in &h.devices {
                let carries = |e: &Event| e.person == *device || e.linked.as_ref() == Some(device);
                let on_device: Vec<&Event> = h.events.iter().filter(|e| carries(e)).collect();
                let login = on_device.iter().position(|e| e.linked.is_some());
                match (&h.person, login) {
                    // The login is the device's last event under its anonymous id; the
                    // earlier ones are anonymous only.
                    (PersonKey::User(_), Some(at)) => {
                        assert_eq!(at, on_device.len() - 1, "{:?}", h.person);
                        assert_eq!(on_device[at].person, h.person);
                        assert!(on_device[..at].iter().all(|e| e.person == *device));
                    }
                    (PersonKey::User(_), None) => {}
                    (PersonKey::Anonymous(_), _) => {
                        assert_eq!(*device, h.person);
                        assert!(login.is_none(), "an anonymous visitor never logs in");
                    }
                }
            }
            logged_in += usize::from(!logins.is_empty());
            several += usize::from(logins.len() > 1);
        }
        let anonymous = people
            .iter()
            .filter(|h| matches!(h.person, PersonKey::Anonymous(_)))
            .count();
        assert!((50..=100).contains(&anonymous), "{anonymous} never log in");
        assert!(logged_in >= 90, "only {logged_in} people logged in");
        assert!(several >= 20, "only {several} logged in on several devices");
    }

    #[test]
    fn personas_behave_differently() {
        let people = simulate(&config());
        let purchases = |p: Persona| {
            let hs: Vec<_> = people.iter().filter(|h| h.persona == p).collect();
            let n: usize = hs
                .iter()
                .map(|h| {
                    h.events
                        .iter()
                        .filter(|e| e.kind == EventKind::Purchase)
                        .count()
                })
                .sum();
            n as f64 / hs.len().max(1) as f64
        };
        assert!(purchases(Persona::EngagedShopper) > 3.0 * purchases(Persona::Browser));
    }
}
