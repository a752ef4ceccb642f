//! The built-in corpus: a deterministic generator of simple English children's stories —
//! named characters, places, objects and feelings, a small plot with a beginning, a problem, a
//! turn and an end, and dialogue. Every choice comes from a seeded RNG, so a seed names one
//! corpus on every machine. It is the data of the default run and of tests, with real
//! structure for a small model to learn; it is no substitute for real corpora in benchmarks.

use crate::rng::Rng;

const NAMES: &[&str] = &[
    "Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Lucy", "Sam", "Anna", "Jack", "Emma", "Leo", "Zoe", "Finn", "Ruby",
    "Owen", "Ella", "Noah", "Ivy", "Jake", "Rosa", "Timmy", "Kate", "Pip", "Nina", "Oscar", "Molly", "Theo", "Daisy",
    "Hugo", "Bella", "Eli", "Lola", "Milo", "Ada", "Rex", "Tilly", "Gus", "Poppy", "Otto",
];
const KINDS: &[&str] = &[
    "girl", "boy", "cat", "dog", "bunny", "bear", "fox", "duck", "mouse", "frog", "bird", "puppy", "kitten", "owl",
    "turtle", "pig", "lamb", "squirrel", "hedgehog", "dragon",
];
const ADJECTIVES: &[&str] = &[
    "little", "happy", "curious", "brave", "shy", "kind", "small", "funny", "gentle", "clever", "sleepy", "friendly",
    "busy", "quiet", "silly", "cheerful", "careful", "tiny", "proud", "playful", "young", "wise", "bold", "calm",
    "lonely", "eager", "honest", "clumsy", "polite", "hungry",
];
const PLACES: &[&str] = &[
    "in a small house by the sea",
    "in a big green forest",
    "on a quiet farm",
    "near a sunny park",
    "in a busy town",
    "by a blue lake",
    "at the edge of a meadow",
    "in a cozy cottage",
    "under an old oak tree",
    "on a windy hill",
    "in a garden full of flowers",
    "near a little river",
    "in a village by the mountains",
    "in a tall yellow house",
    "behind the school",
    "at the end of a long road",
    "in a warm burrow",
    "on a tiny island",
    "next to a bakery",
    "in a quiet valley",
    "by the railway station",
    "in a colorful tent",
    "near the old bridge",
    "on a boat",
    "in a snowy land",
];
const OBJECTS: &[&str] = &[
    "red ball",
    "blue kite",
    "shiny stone",
    "wooden boat",
    "teddy bear",
    "yellow hat",
    "big book",
    "little drum",
    "green umbrella",
    "toy car",
    "paper star",
    "soft blanket",
    "silver bell",
    "magic wand",
    "sand bucket",
    "purple scarf",
    "music box",
    "glass jar",
    "orange balloon",
    "picture book",
    "new bike",
    "tiny key",
    "warm cup",
    "old map",
    "golden coin",
    "pink shell",
    "white feather",
    "clay pot",
    "striped sock",
    "box of crayons",
    "kite string",
    "jar of honey",
    "little flag",
    "snow globe",
    "flower crown",
    "toy robot",
    "wooden spoon",
    "painted egg",
    "bag of seeds",
    "lantern",
];
const FRIENDS: &[&str] = &[
    "a wise old owl",
    "a friendly dog",
    "a small bird",
    "a kind grandma",
    "a tall giraffe",
    "a busy bee",
    "a happy frog",
    "a gentle cow",
    "a little girl",
    "a curious boy",
    "a fast rabbit",
    "a sleepy bear",
    "a funny monkey",
    "a brave ant",
    "a helpful mouse",
];
const FEELINGS_GOOD: &[&str] = &["happy", "glad", "proud", "excited", "calm", "thankful", "cheerful", "joyful"];
const FEELINGS_BAD: &[&str] = &["sad", "scared", "worried", "upset", "lonely", "angry", "nervous", "grumpy"];
const TIMES: &[&str] = &[
    "One day",
    "One sunny morning",
    "One rainy afternoon",
    "One cold evening",
    "Early one morning",
    "On a windy day",
    "One summer day",
    "On a snowy night",
    "After lunch one day",
    "One bright spring day",
];
const WEATHER: &[&str] = &[
    "The sun was warm.",
    "The wind was soft.",
    "The sky was full of clouds.",
    "It was a little cold.",
    "Birds sang in the trees.",
];
const ACTIVITIES: &[&str] = &[
    "play in the park",
    "look at the stars",
    "jump in puddles",
    "read stories",
    "build towers of blocks",
    "sing songs",
    "draw pictures",
    "pick flowers",
    "run in the grass",
    "splash in the water",
    "bake cookies",
    "watch the boats",
    "climb trees",
    "chase butterflies",
    "dance in the rain",
];

fn pick<'a>(rng: &mut Rng, list: &[&'a str]) -> &'a str {
    list[rng.below(list.len() as u64) as usize]
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" }
}

/// One story, several sentences, ending with "The end."
pub fn story(rng: &mut Rng) -> String {
    let name = pick(rng, NAMES);
    let kind = pick(rng, KINDS);
    let adj = pick(rng, ADJECTIVES);
    let place = pick(rng, PLACES);
    let object = pick(rng, OBJECTS);
    let friend = pick(rng, FRIENDS);
    let good = pick(rng, FEELINGS_GOOD);
    let bad = pick(rng, FEELINGS_BAD);
    let activity = pick(rng, ACTIVITIES);
    let mut s = Vec::new();
    s.push(format!("Once upon a time, there was {} {adj} {kind} named {name}.", article(adj)));
    s.push(format!("{name} lived {place}."));
    s.push(format!("{name} loved to {activity}."));
    s.push(format!("{name} had {} {object} and took it everywhere.", article(object)));
    s.push(format!("{}, {}", pick(rng, TIMES), pick(rng, WEATHER).to_lowercase()));
    match rng.below(5) {
        0 => {
            s.push(format!("{name} could not find the {object}."));
            s.push(format!("{name} felt {bad} and looked under the bed and behind the door."));
            s.push(format!("\"Where is my {object}?\" {name} asked."));
            s.push(format!("Then {name} met {friend}."));
            s.push("\"I will help you look,\" said the friend.".to_string());
            s.push(format!(
                "Together they found the {object} near the {}.",
                pick(rng, &["door", "tree", "window", "river", "garden"])
            ));
            s.push(format!("{name} felt {good} and said, \"Thank you!\""));
        }
        1 => {
            s.push(format!("{name} saw {friend} sitting alone."));
            s.push(format!("The friend looked {bad}."));
            s.push(format!("\"Do you want to {activity} with me?\" asked {name}."));
            s.push("\"Yes, please!\" said the friend with a big smile.".to_string());
            s.push(format!("They played all day, and {name} shared the {object}."));
            s.push(format!("{name} felt {good} to have a new friend."));
        }
        2 => {
            s.push(format!("A big storm came and {name} felt {bad}."));
            s.push(format!("\"I do not like the thunder,\" said {name}."));
            s.push(format!("{} came and held {name} close.", capitalize(friend)));
            s.push("\"The storm will pass. You are safe,\" said the friend.".to_string());
            s.push("Soon the rain stopped and a rainbow came out.".to_string());
            s.push(format!("{name} was not {bad} anymore and felt {good}."));
        }
        3 => {
            s.push(format!("{name} wanted to share the {object} with {friend}, but {name} was {bad}."));
            s.push(format!("\"What if I never get it back?\" {name} thought."));
            s.push(format!("Then {name} remembered that sharing is kind."));
            s.push(format!("\"Here, you can use my {object},\" said {name}."));
            s.push(format!("The friend was so {good} and gave it back with a hug."));
            s.push(format!("{name} learned that sharing makes everyone {good}."));
        }
        _ => {
            s.push(format!("{name} wanted to climb a very tall hill, but {name} felt {bad}."));
            s.push(format!("\"You can do it,\" said {friend}."));
            s.push(format!("{name} took one small step, and then another."));
            s.push(format!("At the top, {name} could see the whole land and shouted, \"I did it!\""));
            s.push(format!("{name} felt {good} and brave."));
        }
    }
    s.push(match rng.below(3) {
        0 => format!("From that day on, {name} always kept the {object} close."),
        1 => format!("That night, {name} went to sleep with a smile."),
        _ => format!("{name} and the friend played together every day after that."),
    });
    s.push("The end.".to_string());
    s.join(" ")
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map_or(String::new(), |f| f.to_uppercase().collect::<String>() + c.as_str())
}

/// `n` stories from `seed`, in order.
pub fn stories(seed: u64, n: usize) -> Vec<String> {
    let mut rng = Rng::derive(seed, 0x0570_81E5);
    (0..n).map(|_| story(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn deterministic_varied_and_complete() {
        let a = stories(7, 3000);
        assert_eq!(a, stories(7, 3000));
        assert_ne!(a[0], stories(8, 1)[0]);
        let sentences: HashSet<&str> =
            a.iter().flat_map(|s| s.split_inclusive(['.', '!', '?'])).map(str::trim).collect();
        assert!(sentences.len() >= 10_000, "only {} distinct sentences", sentences.len());
        for s in &a {
            assert!(s.starts_with("Once upon a time") && s.ends_with("The end."), "{s}");
            assert!(s.contains('"'), "every story has dialogue: {s}");
        }
        let words: usize = a.iter().map(|s| s.split_whitespace().count()).sum();
        assert!(words / a.len() > 60, "stories are {} words on average", words / a.len());
    }
}
