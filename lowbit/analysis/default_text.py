"""The text `lowbit analyze` and `lowbit demo range` read when no --text is given.

Written for lowbit (no third-party source): plain English of several kinds (narrative, technical,
numbers, dialogue, lists), about 1,250 tokens for the SmolLM2 and Gemma 3 tokenizers, so that the
default four windows of 256 tokens differ. Outliers show up on any text; perplexities on it are only
comparable with each other.
"""
from __future__ import annotations

import hashlib

NAME = "built-in sample text (lowbit.analysis.default_text)"

TEXT = """\
The lighthouse on the northern cape was built in 1871, after two ships ran aground on the same reef within a \
single winter. Its keeper, a retired carpenter named Elias Brandt, kept a logbook for thirty-four years. Most \
entries are short: the direction of the wind, the height of the swell, the number of vessels that passed before \
midnight. Some are longer. On the night of 12 March 1889 he wrote that the lamp had burned for nineteen hours \
without a pause, that the fog was so thick he could not see the gallery rail, and that he had rung the bell by \
hand until his arms gave out.

Today the tower is automated. A small solar panel charges a bank of batteries, and a light-emitting diode \
replaces the old paraffin burner. The beam still turns once every ten seconds, because sailors learned that \
rhythm long before anyone alive was born, and charts across the region still list it.

How a bread dough rises is a question of chemistry as much as of patience. Yeast feeds on the sugars released \
when flour meets water, and it gives off carbon dioxide and a little alcohol. The gas is trapped by a network of \
gluten proteins, which stretch like a balloon as the bubbles grow. A warm kitchen speeds this up; a cold one \
slows it down, which is why many bakers leave their dough in the refrigerator overnight. The slower rise gives \
the bacteria in the dough more time to produce acids, and those acids are what make a sourdough taste sour.

A simple loaf needs four things:
1. 500 grams of flour, preferably with at least 12 percent protein;
2. 350 grams of water at about 30 degrees Celsius;
3. 10 grams of salt;
4. 7 grams of dried yeast, or 100 grams of an active starter.

Mix the flour and water first and let them rest for half an hour. Add the salt and the yeast, fold the dough \
every thirty minutes for two hours, shape it, and bake it at 240 degrees for about forty minutes, the first \
twenty with a lid on the pot.

"Are you sure this is the right road?" Mara asked, looking at the map that was now upside down on her knees.
"No," said her brother. "But it is a road, and it goes north, and the river is on our left. That was the plan."
"The plan also said we would be there by noon."
"The plan did not know about the sheep."
They both laughed, because for twenty minutes a flock of several hundred sheep had walked in front of the car at \
exactly the speed of a sheep, and there had been nothing to do but wait and count them.

In computing, a number is stored with a fixed budget of bits. A 32-bit floating-point value spends one bit on \
its sign, eight bits on its exponent and twenty-three on its fraction, so it can describe both the distance \
between two atoms and the distance between two galaxies, though not with the same absolute precision. When the \
budget shrinks to eight or four bits, a choice has to be made: either the format covers a wide range of values \
coarsely, or a narrow range finely. A few very large values force the first choice on everything else.

The town council met on Tuesday evening to discuss the new bridge. Three options were presented. The first, a \
steel arch, would cost 4.2 million and take two years to build. The second, a concrete beam bridge, would cost \
2.9 million but would need a pillar in the middle of the river, which the fishing club opposed. The third \
option was to repair the old stone bridge, at a cost of 1.1 million, and to limit it to pedestrians and \
bicycles. After two hours of debate the council voted seven to four for the repair, and asked the engineers \
to report again in the spring.

Honeybees communicate the location of food with a dance. A forager that has found a rich patch of flowers \
returns to the hive and walks in a figure of eight on the vertical surface of the comb. During the straight \
middle part of the figure she waggles her body from side to side. The angle of that straight run, measured \
from the vertical, tells the other bees the angle of the flowers from the direction of the sun. The length of \
the waggle run tells them how far to fly: roughly one second of waggling for every kilometre. Bees that watch \
the dance then leave the hive and search in the right direction, smelling for the scent the forager carried \
back on her body.

Maps have always been arguments as well as pictures. A map must flatten a round planet onto a flat sheet, and \
every way of doing that distorts something: areas, angles, distances or shapes. The projection that sailors \
preferred kept angles true, so that a straight line on the chart was a line of constant compass bearing, but \
it made the lands near the poles look far larger than they are. Greenland appears as large as Africa, though \
Africa is about fourteen times larger. Choosing a projection is therefore choosing which truth to keep.

On the first morning of the school year the teacher wrote three questions on the board. What do you already \
know? What do you want to find out? How will you know when you have found it? She said that the last question \
was the hardest, and that scientists spend much of their lives arguing about it. Then she handed out magnifying \
glasses and sent the class into the garden to look at the undersides of leaves.

By late afternoon the storm had passed. The streets were full of small branches and the gutters ran like \
streams, but the air smelled clean, and the light that came through the clouds turned every wet roof gold. \
People came out of their houses to look at the sky, to talk to their neighbours, and to check on the old \
chestnut tree in the square, which had stood there for more than two hundred years and had lost, this time, \
only a single limb.
"""

SHA256 = hashlib.sha256(TEXT.encode("utf-8")).hexdigest()


def default_text():
    """The built-in text as a lowbit.data.text.Text."""
    from ..data.text import Text

    return Text(TEXT, NAME, SHA256)
