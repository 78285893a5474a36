"""The IEEE "Harvard" sentences (IEEE Recommended Practice for Speech Quality Measurements, 1969; public
domain), lists 1 to 6: phonetically balanced everyday sentences, the demo's unseen-word test.

Every word of these lists is kept out of the demo's training corpus (`vall_e.data.lexicon` excludes
them by spelling), so the demo measures reading, not recall. Lists 4-6 are what the demo reports;
lists 1-3 were the development set its settings were chosen on, so the reported numbers come from
sentences no choice was tuned to.
"""
from __future__ import annotations

from vall_e.data.lexicon import words_of

HARVARD: dict[int, tuple[str, ...]] = {
    1: ("The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
        "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
        "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
        "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
        "Four hours of steady work faced us.", "A large size in stockings is hard to sell."),
    2: ("The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
        "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
        "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
        "Smoky fires lack flame and heat.", "The soft cushion broke the man's fall.",
        "The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds."),
    3: ("The small pup gnawed a hole in the sock.", "The fish twisted and turned on the bent hook.",
        "Press the pants and sew a button on the vest.", "The swan dive was far short of perfect.",
        "The beauty of the view stunned the young boy.", "Two blue fish swam in the tank.",
        "Her purse was full of useless trash.", "The colt reared and threw the tall rider.",
        "It snowed, rained, and hailed the same morning.", "Read verse out loud for pleasure."),
    4: ("Hoist the load to your left shoulder.", "Take the winding path to reach the lake.",
        "Note closely the size of the gas tank.", "Wipe the grease off his dirty face.",
        "Mend the coat before you go out.", "The wrist was badly strained and hung limp.",
        "The stray cat gave birth to kittens.", "The young girl gave no clear response.",
        "The meal was cooked before the bell rang.", "What joy there is in living."),
    5: ("A king ruled the state in the early days.", "The ship was torn apart on the sharp reef.",
        "Sickness kept him home the third week.", "The wide road shimmered in the hot sun.",
        "The lazy cow lay in the cool grass.", "Lift the square stone over the fence.",
        "The rope will bind the seven books at once.", "Hop over the fence and plunge in.",
        "The friendly gang left the drug store.", "Mesh wire keeps chicks inside."),
    6: ("The frosty air passed through the coat.", "The crooked maze failed to fool the mouse.",
        "Adding fast leads to wrong sums.", "The show was a flop from the very start.",
        "A saw is a tool used for making boards.", "The wagon moved on well oiled wheels.",
        "March the soldiers past the next hill.", "A cup of sugar makes sweet fudge.",
        "Place a rosebush near the porch steps.", "Both lost their lives in the raging storm."),
}

DEVELOPMENT_LISTS = (1, 2, 3)
TEST_LISTS = (4, 5, 6)


def sentences(lists: tuple[int, ...] = TEST_LISTS) -> list[str]:
    return [s for n in lists for s in HARVARD[n]]


def all_words() -> set[str]:
    """Every word of every list (what the training corpus must not contain)."""
    return set().union(*(words_of(s) for lst in HARVARD.values() for s in lst))
