"""What the answer says about a fruit beyond its folder name: display name, variety, species, family, one sentence.

The table covers the species of the 160 folders of the current Fruits-360 release (../shared/data/
fruits360-classes.txt); a folder is matched to its species by the longest species name its words start with, and
the words after it are its variety or state ("Apple Braeburn 1" -> apple, Braeburn). Facts are written only where
they are certain: a folder whose fruit is not known for sure ("Nut Forest") or a class of another release gets a
name derived from its folder and nulls, never a guess.
"""

from __future__ import annotations

import re
from typing import Any

#: species key (the folder's leading words) -> (display name, scientific name, family, one sentence)
SPECIES: dict[str, tuple[str, str, str, str]] = {
    "Apple": ("Apple", "Malus domestica", "Rosaceae",
              "A pome fruit grown in temperate regions worldwide, with thousands of cultivars."),
    "Apricot": ("Apricot", "Prunus armeniaca", "Rosaceae",
                "A stone fruit with velvety orange skin, a close relative of the plum."),
    "Avocado": ("Avocado", "Persea americana", "Lauraceae",
                "A buttery, oil-rich single-seeded berry of a tree native to Mexico and Central America."),
    "Banana": ("Banana", "Musa spp.", "Musaceae",
               "A berry of a giant herb; most cultivars are seedless and grown from suckers."),
    "Beans": ("Beans", "Phaseolus vulgaris", "Fabaceae", "The pods of the common bean, a legume from the Americas."),
    "Beetroot": ("Beetroot", "Beta vulgaris", "Amaranthaceae",
                 "The swollen taproot of the beet, coloured deep red by betalain pigments."),
    "Blackberrie": ("Blackberry", "Rubus subg. Rubus", "Rosaceae",
                    "An aggregate of small drupelets that turns from green to red to black as it ripens."),
    "Blueberry": ("Blueberry", "Vaccinium sect. Cyanococcus", "Ericaceae",
                  "A small blue berry of a North American shrub, dusted with a pale waxy bloom."),
    "Cabbage": ("Cabbage", "Brassica oleracea var. capitata", "Brassicaceae",
                "A head of tightly packed leaves; red and white cabbages are cultivars of one species."),
    "Cactus fruit": ("Cactus fruit (prickly pear)", "Opuntia ficus-indica", "Cactaceae",
                     "The fruit of the prickly pear cactus, whose skin carries tiny barbed spines."),
    "Caju seed": ("Cashew nut", "Anacardium occidentale", "Anacardiaceae",
                  "The kidney-shaped seed that hangs below the cashew apple."),
    "Cantaloupe": ("Cantaloupe", "Cucumis melo", "Cucurbitaceae",
                   "A muskmelon with netted or ribbed skin and sweet orange flesh."),
    "Carambula": ("Carambola (star fruit)", "Averrhoa carambola", "Oxalidaceae",
                  "A ridged tropical fruit whose cross-section is a five-pointed star."),
    "Carrot": ("Carrot", "Daucus carota subsp. sativus", "Apiaceae", "The orange taproot of the cultivated carrot."),
    "Cauliflower": ("Cauliflower", "Brassica oleracea var. botrytis", "Brassicaceae",
                    "A white head of undeveloped flower buds of a cabbage relative."),
    "Cherry": ("Cherry", "Prunus avium", "Rosaceae", "The sweet cherry, a small stone fruit on a long stalk."),
    "Chestnut": ("Chestnut", "Castanea sativa", "Fagaceae", "The sweet chestnut, a starchy nut from a spiny husk."),
    "Clementine": ("Clementine", "Citrus × clementina", "Rutaceae",
                   "A small, easy-peeling, usually seedless mandarin hybrid."),
    "Cocos": ("Coconut", "Cocos nucifera", "Arecaceae",
              "The fibrous drupe of the coconut palm, holding white flesh and coconut water."),
    "Corn": ("Corn (maize)", "Zea mays", "Poaceae", "The ear of maize, a cereal grass domesticated in Mexico."),
    "Cucumber": ("Cucumber", "Cucumis sativus", "Cucurbitaceae",
                 "A watery fruit of the gourd family, usually eaten before it ripens."),
    "Dates": ("Dates", "Phoenix dactylifera", "Arecaceae", "The sweet fruit of the date palm, eaten fresh or dried."),
    "Eggplant": ("Eggplant (aubergine)", "Solanum melongena", "Solanaceae",
                 "A glossy, usually purple berry of the nightshade family."),
    "Fig": ("Fig", "Ficus carica", "Moraceae",
            "A fleshy receptacle that encloses hundreds of tiny flowers, which become its seeds."),
    "Ginger Root": ("Ginger root", "Zingiber officinale", "Zingiberaceae",
                    "The pungent underground stem (rhizome) of the ginger plant."),
    "Gooseberry": ("Gooseberry", "Ribes uva-crispa", "Grossulariaceae",
                   "A tart, veined berry of a thorny European shrub."),
    "Granadilla": ("Granadilla", "Passiflora ligularis", "Passifloraceae",
                   "The sweet granadilla, a hard orange shell filled with sweet, seedy grey pulp."),
    "Grape": ("Grape", "Vitis vinifera", "Vitaceae", "Berries of the grapevine, eaten fresh, dried or made into wine."),
    "Grapefruit": ("Grapefruit", "Citrus × paradisi", "Rutaceae",
                   "A large, bittersweet citrus that arose in the Caribbean from a pomelo and an orange."),
    "Guava": ("Guava", "Psidium guajava", "Myrtaceae", "A fragrant tropical fruit with many small, hard seeds."),
    "Hazelnut": ("Hazelnut", "Corylus avellana", "Betulaceae", "The nut of the common hazel, in a hard smooth shell."),
    "Huckleberry": ("Huckleberry", "Vaccinium spp.", "Ericaceae",
                    "A small dark berry, a wild cousin of the blueberry."),
    "Kaki": ("Persimmon (kaki)", "Diospyros kaki", "Ebenaceae",
             "An orange fruit; astringent cultivars are only eaten once soft and fully ripe."),
    "Kiwi": ("Kiwi", "Actinidia deliciosa", "Actinidiaceae",
             "A fuzzy brown berry with bright green flesh and tiny black seeds."),
    "Kohlrabi": ("Kohlrabi", "Brassica oleracea var. gongylodes", "Brassicaceae",
                 "The swollen stem of a cabbage relative, eaten raw or cooked."),
    "Kumquats": ("Kumquat", "Citrus japonica", "Rutaceae", "A tiny citrus eaten whole: sweet peel, sour flesh."),
    "Lemon": ("Lemon", "Citrus × limon", "Rutaceae", "A sour, yellow citrus used for its juice and zest."),
    "Lemon Meyer": ("Meyer lemon", "Citrus × meyeri", "Rutaceae",
                    "A lemon-mandarin hybrid, sweeter and less acidic than a common lemon."),
    "Limes": ("Lime", "Citrus × aurantiifolia", "Rutaceae", "A small, green, sour citrus."),
    "Lychee": ("Lychee", "Litchi chinensis", "Sapindaceae",
               "A rough, red-skinned fruit with translucent, perfumed white flesh."),
    "Mandarine": ("Mandarin", "Citrus reticulata", "Rutaceae",
                  "A small, loose-skinned citrus, a parent of the orange and of many hybrids."),
    "Mango": ("Mango", "Mangifera indica", "Anacardiaceae", "A stone fruit from South Asia with sweet, orange flesh."),
    "Mangostan": ("Mangosteen", "Garcinia mangostana", "Clusiaceae",
                  "Sweet white segments inside a thick purple rind."),
    "Maracuja": ("Passion fruit (maracujá)", "Passiflora edulis", "Passifloraceae",
                 "A round shell filled with tart, aromatic pulp around black seeds."),
    "Melon Piel de Sapo": ("Piel de sapo melon", "Cucumis melo", "Cucurbitaceae",
                           "A Spanish winter melon with green, mottled 'toad skin' and pale, sweet flesh."),
    "Mulberry": ("Mulberry", "Morus spp.", "Moraceae", "A multiple fruit that looks like an elongated blackberry."),
    "Nectarine": ("Nectarine", "Prunus persica var. nucipersica", "Rosaceae", "A smooth-skinned form of the peach."),
    "Nut Pecan": ("Pecan", "Carya illinoinensis", "Juglandaceae",
                  "The nut of a hickory native to the southern United States and Mexico."),
    "Onion": ("Onion", "Allium cepa", "Amaryllidaceae", "The layered bulb of the onion plant."),
    "Orange": ("Orange", "Citrus × sinensis", "Rutaceae", "The sweet orange, the most widely grown citrus fruit."),
    "Papaya": ("Papaya", "Carica papaya", "Caricaceae", "A large tropical berry with orange flesh and black seeds."),
    "Passion Fruit": ("Passion fruit", "Passiflora edulis", "Passifloraceae",
                      "A round shell filled with tart, aromatic pulp around black seeds."),
    "Peach": ("Peach", "Prunus persica", "Rosaceae", "A fuzzy-skinned stone fruit first domesticated in China."),
    "Pear": ("Pear", "Pyrus communis", "Rosaceae", "The European pear, a pome that ripens best off the tree."),
    "Pepino": ("Pepino", "Solanum muricatum", "Solanaceae",
               "A sweet, melon-flavoured fruit of an Andean nightshade."),
    "Pepper": ("Bell pepper", "Capsicum annuum", "Solanaceae",
               "A mild capsicum; green ones are unripe, and they turn yellow, orange or red as they ripen."),
    "Physalis": ("Physalis (cape gooseberry)", "Physalis peruviana", "Solanaceae",
                 "An orange berry wrapped in a papery husk."),
    "Pineapple": ("Pineapple", "Ananas comosus", "Bromeliaceae",
                  "A multiple fruit made of many berries fused around a fibrous core."),
    "Pistachio": ("Pistachio", "Pistacia vera", "Anacardiaceae",
                  "A green seed in a shell that splits open as it ripens."),
    "Pitahaya Red": ("Red pitahaya (dragon fruit)", "Selenicereus spp.", "Cactaceae",
                     "The scaly, pink fruit of a climbing cactus."),
    "Plum": ("Plum", "Prunus domestica", "Rosaceae", "A juicy stone fruit; dried, it becomes a prune."),
    "Pomegranate": ("Pomegranate", "Punica granatum", "Lythraceae",
                    "A leathery fruit packed with juicy seed coats (arils)."),
    "Pomelo Sweetie": ("Sweetie (oroblanco)", "Citrus maxima × Citrus × paradisi", "Rutaceae",
                       "A sweet, green-skinned hybrid of the pomelo and the grapefruit."),
    "Potato": ("Potato", "Solanum tuberosum", "Solanaceae", "The starchy tuber of a nightshade from the Andes."),
    "Potato Sweet": ("Sweet potato", "Ipomoea batatas", "Convolvulaceae",
                     "The sweet storage root of a morning glory: not a potato at all."),
    "Quince": ("Quince", "Cydonia oblonga", "Rosaceae", "A hard, fragrant pome, usually cooked into jams or pastes."),
    "Rambutan": ("Rambutan", "Nephelium lappaceum", "Sapindaceae", "A hairy, red relative of the lychee."),
    "Raspberry": ("Raspberry", "Rubus idaeus", "Rosaceae",
                  "A red aggregate fruit that slips off its core when picked."),
    "Redcurrant": ("Redcurrant", "Ribes rubrum", "Grossulariaceae", "Small, translucent, tart red berries on strings."),
    "Salak": ("Salak (snake fruit)", "Salacca zalacca", "Arecaceae",
              "The fruit of an Indonesian palm, with scaly brown skin like a snake's."),
    "Strawberry": ("Strawberry", "Fragaria × ananassa", "Rosaceae",
                   "An accessory fruit: the true fruits are the small 'seeds' on its surface."),
    "Tamarillo": ("Tamarillo (tree tomato)", "Solanum betaceum", "Solanaceae", "An egg-shaped, tangy fruit."),
    "Tangelo": ("Tangelo", "Citrus × tangelo", "Rutaceae", "A hybrid of a mandarin with a pomelo or grapefruit."),
    "Tomato": ("Tomato", "Solanum lycopersicum", "Solanaceae", "A berry of a nightshade from western South America."),
    "Walnut": ("Walnut", "Juglans regia", "Juglandaceae", "The nut of the Persian walnut, in a wrinkled shell."),
    "Watermelon": ("Watermelon", "Citrullus lanatus", "Cucurbitaceae", "A large, watery melon with sweet red flesh."),
    "Zucchini": ("Zucchini (courgette)", "Cucurbita pepo", "Cucurbitaceae", "A summer squash picked while immature."),
}
#: Fruits-360 folders (display names) whose fruit is not known for sure, so they have no entry in SPECIES: real
#: classes all the same (a mapping file may name them).
UNCERTAIN = frozenset({"Nut Forest"})
#: Folder words that name a state, not a variety, spelled as the dataset spells them.
_SPELLING = {"rippen": "ripe", "Rippen": "ripe"}


def display_name(label: str) -> str:
    """A readable name from a Fruits-360 folder name: its trailing variant number dropped ("Apple Braeburn 1"
    -> "Apple Braeburn", "Tomato 4" -> "Tomato")."""
    name = re.sub(r"(\s+\d+)+$", "", label.strip())
    return name or label


def _species(words: list[str]) -> str | None:
    for n in range(len(words), 0, -1):
        key = " ".join(words[:n])
        if key in SPECIES:
            return key
    return None


def species_key(label: str) -> str:
    """The species a class belongs to, as SPECIES's key ("Apple Red 2" -> "Apple"); a class the table does not
    know is its own species, by its folder-derived name ("Nut Forest 1" -> "Nut Forest")."""
    base = display_name(label)
    return _species(base.split()) or base


def species_name(label: str) -> str:
    """The readable name of a class's species ("Apple Red 2" -> "Apple", "Cocos 1" -> "Coconut")."""
    key = species_key(label)
    return SPECIES[key][0] if key in SPECIES else key


def describe(label: str) -> dict[str, Any]:
    """Information about a class for the answer: display name, variety or state, scientific name, family and one
    sentence from SPECIES; a class it does not know gets its folder-derived name and nulls."""
    base = display_name(label)
    words = base.split()
    key = _species(words)
    if key is None:
        return {"label": label, "name": base, "variety": None, "scientific_name": None, "family": None,
                "about": None, "source": "derived from the folder name"}
    name, scientific, family, about = SPECIES[key]
    rest = " ".join(_SPELLING.get(w, w) for w in words[len(key.split()):])
    return {"label": label, "name": f"{name} – {rest}" if rest else name, "variety": rest or None,
            "scientific_name": scientific, "family": family, "about": about, "source": "fruitpipe's species table"}
