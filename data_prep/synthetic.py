"""The embedded demo world: users with latent interests shop in several domains, each with its own product vocabulary.
Written as raw CSVs (with the latent interests in side files) and imported through the same pipeline as real data."""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # Run by path, this file's folder would lead sys.path and data_prep/csv.py would shadow the stdlib's csv.
    sys.exit("error: run the generator as a module from the repository root: python -m data_prep.synthetic --help")

import argparse
import csv  # the standard library's (absolute import), not data_prep.csv
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.csv import import_csv
from data_prep.pipeline import (
    DataError,
    PrepConfig,
    add_pipeline_arguments,
    config_from_args,
    replace_path,
    run_cli,
)

DOMAINS = ("toys", "tools", "electronics", "sports")

# VOCABULARY[interest][domain] = (products, phrases). A product reads "noun: spec | spec"; phrases say what a listing
# is for. Each interest speaks a different vocabulary in each domain, so what links a camper's saw in tools to their
# binoculars in toys is meaning, not shared words.
VOCABULARY: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    "camping": {
        "toys": ([
            "Kids Binoculars: 8x21 | 10x25", "Pop-Up Play Tent: 4-Person | with Carry Bag",
            "Explorer Kit: 12-Piece | 20-Piece", "Toy Campfire Set: with Flickering Light | 6-Piece",
            "Bug Catcher Kit: with Magnifier | 8-Piece",
            "Walkie Talkies for Kids: 2-Pack, 3-Mile Range | 3-Pack, 2-Mile Range",
        ], ["for Camping Adventures", "for Backyard Explorers", "for Young Scouts"]),
        "tools": ([
            "Folding Camp Saw: 7-inch Blade | 10-inch Blade", "Hatchet with Sheath: 14-inch | 17-inch",
            "Tent Stake Mallet: 16 oz | 24 oz", "Ferro Rod Fire Starter: 1/2 x 5-inch | 3/8 x 4-inch",
            "Survival Multi-Tool: 18-in-1 | 12-in-1", "Collapsible Trenching Shovel: 24-inch | 32-inch",
        ], ["for Bushcraft and Survival", "for Campsite Chores", "Backpacking Gear"]),
        "electronics": ([
            "Rechargeable LED Lantern: 1000 Lumens | 500 Lumens", "Solar Power Bank: 20000mAh | 26800mAh",
            "Hand Crank Emergency Radio: AM/FM/NOAA | with 4000mAh Battery",
            "Handheld GPS Navigator: 2.2-inch Display | 3-inch Touchscreen",
            "USB-C Headlamp: 350 Lumens | 1200 Lumens", "Portable Power Station: 300W | 500Wh",
        ], ["for Camping and Power Outages", "Off-Grid Ready", "for Overnight Trips"]),
        "sports": ([
            "Backpacking Tent: 2-Person | 3-Person", "Mummy Sleeping Bag: 20°F | 40°F",
            "Self-Inflating Sleeping Pad: 3-inch Thick | 2-inch Thick",
            "Trekking Poles: Pair, Aluminum | Pair, Carbon Fiber", "Internal Frame Backpack: 50L | 65L",
            "Camping Hammock: Double, 400 lb Capacity | Single, with Tree Straps",
        ], ["for Backpacking and Hiking", "3-Season", "for Thru-Hikers"]),
    },
    "cooking": {
        "toys": ([
            "Play Kitchen Set: with Realistic Sounds | with Sink and Oven", "Wooden Play Food: 32-Piece | 50-Piece",
            "Kids Baking Set: with Real Utensils, 20-Piece | with Recipe Cards",
            "Toy Pots and Pans: 12-Piece | 8-Piece", "Pretend Grill Playset: with Light-Up Coals | 18-Piece",
            "Cupcake Decorating Kit for Kids: 24 Cupcake Liners | with Piping Bags",
        ], ["for Little Chefs", "Pretend Cooking Play", "for Junior Bakers"]),
        "tools": ([
            "Whetstone Knife Sharpener: 1000/6000 Grit | 400/1000 Grit",
            "Pull-Down Kitchen Faucet: Single Handle | with Sprayer",
            "Under-Sink Water Filter System: 3-Stage | 5-Stage",
            "Range Hood Filter: Set of 2, 11.75 x 14.25 inch | Set of 3, 10 x 12 inch",
            "Pull-Out Cabinet Organizer: 11-inch Wide | 14-inch Wide",
            "Pot Filler Faucet: Wall Mount | Double Joint Swing Arm",
        ], ["for Home Chefs", "Kitchen Upgrade", "for Busy Kitchens"]),
        "electronics": ([
            "Air Fryer: 5.8 Quart | 4 Quart", "Instant Read Meat Thermometer: 2-Second Readout | with Backlight",
            "Immersion Blender: 500 Watt | 800 Watt", "Electric Gooseneck Kettle: 1.7 Liter | 1.0 Liter",
            "Sous Vide Cooker: 1100W | Wi-Fi, 1000W", "Stand Mixer: 5 Quart, 10 Speeds | 6 Quart, 660W",
        ], ["for Home Cooks", "Dishwasher-Safe Parts", "for Meal Prep"]),
        "sports": ([
            "Portable Charcoal Grill: 14-inch | 18-inch", "Tabletop Propane Griddle: 22-inch | 17-inch",
            "Fish Fillet Knife: 7-inch Flexible Blade | 9-inch Blade", "Rotomolded Cooler: 45 Quart | 25 Quart",
            "BBQ Grill Tool Set: 5-Piece | 20-Piece", "Wood Pellet Smoker Tube: 12-inch | 6-inch",
        ], ["for Tailgating", "for Backyard BBQ", "Cookout Essentials"]),
    },
    "music": {
        "toys": ([
            "Kids Drum Set: 5-Piece | 3-Piece", "Toy Xylophone: 8-Note | 15-Note",
            "Karaoke Machine for Kids: with 2 Microphones | with Disco Lights",
            "Piano Keyboard for Kids: 37 Keys | 61 Keys", "Wooden Rhythm Band Set: 12-Piece | 18-Piece",
            "Toy Ukulele: 21-inch, 4 Strings | 17-inch",
        ], ["for Little Musicians", "Musical Toy", "for Toddler Music Time"]),
        "tools": ([
            "Acoustic Foam Panels: 12-Pack, 2 x 12 x 12 inch | 24-Pack, 1 x 12 x 12 inch",
            "Speaker Wire Stripper: 10-22 AWG | 8-20 AWG",
            "Soldering Station: 60W, Temperature Control | 80W, Digital Display",
            "Guitar Wall Hanger: Set of 3, Hardwood Base | Set of 2",
            "Ceiling Speaker Mounting Bracket: 8-inch | 6.5-inch",
            "Soundproof Door Seal Kit: Adjustable, 36-inch | Weatherstrip, 39-inch",
        ], ["for Home Studios", "for Music Rooms", "for Audio DIY"]),
        "electronics": ([
            "Studio Monitor Headphones: 50mm Drivers | 40mm Drivers",
            "Bluetooth Turntable: 3-Speed | with Built-in Speakers",
            "USB Audio Interface: 2-in/2-out, 24-bit/192kHz | 1-in/2-out",
            "USB Condenser Microphone: Cardioid | with Pop Filter", "MIDI Keyboard Controller: 25 Keys | 49 Keys",
            "Powered Bookshelf Speakers: Pair, 50W | Pair, 42W",
        ], ["for Recording and Podcasting", "for Music Production", "Studio Quality"]),
        "sports": ([
            "Portable Ballet Barre: Double Bar, Adjustable Height | Single Bar, 4 ft",
            "Split-Sole Dance Sneakers: Women's | Men's", "Waterproof Swimming MP3 Player: 8GB | 16GB",
            "Running Armband Phone Holder: for 6.7-inch Phones | with Key Slot",
            "Cheerleading Pom Poms: Pair, 6-inch | Pair, 8-inch", "Tap Dance Shoes: Leather | Lace-Up",
        ], ["for Dance Practice", "for Workouts to Music", "for Studio and Stage"]),
    },
    "gardening": {
        "toys": ([
            "Kids Gardening Tool Set: with Watering Can, 5-Piece | with Tote Bag, 7-Piece",
            "Sunflower Growing Kit for Kids: with Seeds and Pots | Windowsill",
            "Mini Greenhouse Science Kit: STEM | with Grow Light", "Toy Wheelbarrow: Metal | Plastic, Green",
            "Butterfly Garden Habitat: 24-inch, Pop-Up | with Caterpillar Voucher",
            "Ladybug Land Terrarium Kit: with Magnifier | Clear Dome",
        ], ["for Little Gardeners", "Backyard Nature Play", "Grow Your Own"]),
        "tools": ([
            "Bypass Pruning Shears: 8-inch | Titanium-Coated Blade", "Expandable Garden Hose: 50 ft | 100 ft",
            "Cordless String Trimmer: 20V, 12-inch | 40V, 13-inch", "Hose Nozzle Sprayer: 10 Patterns | 8 Patterns",
            "Hori Hori Garden Knife: 7-inch Blade | with Sharpener",
            "Galvanized Raised Garden Bed: 8 x 4 x 1 ft | 6 x 3 x 1 ft",
        ], ["for Lawn and Garden", "for Weeding and Planting", "Yard Work Essential"]),
        "electronics": ([
            "Smart Sprinkler Controller: 8-Zone, Wi-Fi | 16-Zone", "Full Spectrum LED Grow Light: 1000W | 600W",
            "3-in-1 Soil Moisture Meter: pH, Light, Moisture | Bluetooth", "Solar Pathway Lights: 8-Pack | 12-Pack",
            "Indoor Hydroponic Growing System: 12 Pods | 8 Pods",
            "Wireless Weather Station: with Outdoor Sensor | 7-in-1",
        ], ["for Indoor Plants", "for Greenhouses and Gardens", "Plant Care"]),
        "sports": ([
            "Wide Brim Sun Hat: UPF 50+ | Packable", "Birding Binoculars: 10x42, Waterproof | 8x42",
            "Foldable Garden Kneeler and Seat: with Tool Pouches | Heavy Duty",
            "Rubber Garden Boots: Ankle Height | Mid-Calf", "Bocce Ball Set: 8 Balls, 100mm | with Carry Bag",
            "Cooling Neck Gaiter: UPF 50, 2-Pack | 4-Pack",
        ], ["for Yard and Outdoor Work", "for Sunny Days Outside", "for Backyard Afternoons"]),
    },
    "photography": {
        "toys": ([
            "Kids Digital Camera: 1080P, 32GB Card | 2.0-inch Screen",
            "Instant Print Camera for Kids: with 3 Rolls of Paper | with Colored Pens",
            "DIY Pinhole Camera Kit: STEM | Cardboard", "Wooden Toy Camera: with Viewfinder | with Strap",
            "Stop-Motion Animation Studio Kit: with App | with 20 Figures",
            "Kids Video Camera: HD, Dual Lens | Waterproof",
        ], ["for Young Photographers", "First Camera", "for Little Filmmakers"]),
        "tools": ([
            "Precision Screwdriver Set: 64-in-1, for Camera Repair | 42-in-1",
            "Sandbag Weights for Light Stands: 4-Pack, 10 lb | 6-Pack, 5 lb",
            "Clamp Light with Reflector: 8.5-inch | 10.5-inch",
            "Heavy Duty Spring Clamps: 12-Pack, 2-inch | 6-Pack, 4-inch", "Magnifying Lamp: 5X, LED | 3X",
            "Aluminum Step Ladder: 3-Step | 4-Step",
        ], ["for Photo Studios", "for Backdrops and Lighting", "for Shoot Setups"]),
        "electronics": ([
            "Mirrorless Camera Lens: 50mm f/1.8 | 35mm f/1.4", "Aluminum Camera Tripod: 67-inch | 72-inch",
            "LED Ring Light: 18-inch with Stand | 10-inch", "SD Memory Card: 128GB, V30 | 256GB, U3",
            "Dual Camera Battery Charger: with 2 Batteries | USB-C",
            "Softbox Lighting Kit: 2-Pack, 5500K | 3-Pack, 85W",
        ], ["for Portrait Photography", "for DSLR and Mirrorless Cameras", "for Content Creators"]),
        "sports": ([
            "Action Camera Chest Mount Harness: Adjustable | with J-Hook", "Waterproof Camera Dry Bag: 20L | 10L",
            "Helmet Camera Mount: Curved Adhesive, 4-Pack | Chin Mount",
            "Camera Backpack Strap Clip: Quick Release | Aluminum",
            "Underwater Floating Hand Grip: for Action Cameras | with Wrist Strap",
            "Trail Camera: 24MP, Night Vision | 4K, Waterproof",
        ], ["for Hiking and Outdoor Shots", "for Action Photography", "for Wildlife Shots"]),
    },
    "fitness": {
        "toys": ([
            "Toddler Trampoline: 36-inch, with Handle | 40-inch", "Hopper Ball: 18-inch | 22-inch",
            "Balance Stepping Stones: 6-Piece | 11-Piece", "Kids Yoga Cards: 50 Poses | Deck of 32",
            "Backyard Ninja Obstacle Course: 12 Obstacles | 50 ft Slackline",
            "Foam Agility Ladder for Kids: 6 Rungs | with Cones",
        ], ["for Active Kids", "Indoor Play Gym", "Gross Motor Skills"]),
        "tools": ([
            "Interlocking Rubber Floor Tiles: 3/4-inch, 6-Pack | 1/2-inch, 10-Pack",
            "Heavy Bag Ceiling Mount: Steel, 4-Way | Swivel",
            "Wall-Mount Barbell Holder: Vertical, 6 Bars | Horizontal, 4 Bars",
            "Concrete Anchor Bolts: 1/2 x 4-inch, 8-Pack | 3/8 x 3-inch, 20-Pack",
            "Gym Mirror Mounting Clips: 6-Pack | Stainless, 8-Pack",
            "Plyometric Box Plywood Panel: 3/4-inch | 24 x 30 inch",
        ], ["for Home Gyms", "for Garage Gym Builds", "Workout Space"]),
        "electronics": ([
            "Fitness Tracker Watch: Heart Rate, 1.1-inch AMOLED | with GPS",
            "Body Fat Smart Scale: Bluetooth, 13 Metrics | Wi-Fi",
            "Wireless Sport Earbuds: IPX7, Ear Hooks | 40H Playtime",
            "Percussion Massage Gun: 30 Speeds | with 6 Heads",
            "Chest Strap Heart Rate Monitor: ANT+ and Bluetooth | Waterproof",
            "Under Desk Walking Pad Treadmill: 2.5 HP | 265 lb Capacity",
        ], ["for Workouts and Training", "for Runners", "Fitness Tracking"]),
        "sports": ([
            "Adjustable Dumbbells: 25 lb | 52.5 lb", "Non-Slip Yoga Mat: 6mm | 1/4-inch, with Strap",
            "Resistance Bands Set: 5 Levels | with Handles, 11-Piece", "Cast Iron Kettlebell: 20 lb | 35 lb",
            "High-Density Foam Roller: 18-inch | 36-inch", "Doorway Pull-Up Bar: No Screws | Multi-Grip",
        ], ["for Strength Training", "for Home Workouts", "Gym Quality"]),
    },
    "gaming": {
        "toys": ([
            "Fantasy Adventure Board Game: 2-4 Players | 1-5 Players", "Speed Cube: 3x3 | 4x4",
            "Polyhedral Dice Set: 7-Piece | Metal, 7-Piece",
            "Handheld Retro Game Console: 400 Classic Games | 500 Games",
            "Party Card Game: 2-10 Players | for Ages 8 and Up",
            "Strategy Building Game: 100 Tiles | with Miniatures",
        ], ["for Family Game Night", "for Tabletop Fans", "for Young Gamers"]),
        "tools": ([
            "RGB LED Strip Lights: 32.8 ft | 16.4 ft", "Cable Management Raceway Kit: 125-inch | 157-inch",
            "Tri-Wing Screwdriver Set: for Console Repair | 10-Piece",
            "Thermal Paste: 4 Grams, for CPU/GPU | 8 Grams", "Anti-Static Wrist Strap: Adjustable | 2-Pack",
            "Under-Desk Cable Tray: Steel, 43-inch | 31-inch",
        ], ["for Gaming Setups", "for PC Builders", "for Battle Stations"]),
        "electronics": ([
            "Mechanical Gaming Keyboard: RGB, Hot-Swappable | Tenkeyless",
            "Gaming Mouse: 16000 DPI | 26000 DPI, Wireless",
            "Gaming Headset: 7.1 Surround | with Noise-Cancelling Mic",
            "Wireless Controller: for PC and Switch | with Back Buttons",
            "Curved Gaming Monitor: 27-inch, 165Hz | 32-inch, 144Hz",
            "Extended Gaming Mouse Pad: XXL, 31.5 x 11.8 inch | RGB",
        ], ["for PC and Console Gamers", "Esports Grade", "for Competitive Play"]),
        "sports": ([
            "Foosball Table: 48-inch | Tabletop, 20-inch", "Air Hockey Table: 54-inch | with Electronic Scorer",
            "Bristle Dartboard: 18-inch | with 6 Steel-Tip Darts",
            "Ping Pong Paddle Set: 2 Paddles, 3 Balls | 4 Paddles", "Laser Tag Set: 4-Pack | 2 Vests",
            "Billiard Cue Stick: 58-inch | Set of 2",
        ], ["for Game Rooms", "for Family Tournaments", "Arcade Style"]),
    },
    "crafts": {
        "toys": ([
            "Friendship Bracelet Making Kit: with 30 Colors | Loom Included",
            "Paint-Your-Own Birdhouse Kit: 2-Pack | with Paints and Brushes",
            "Modeling Clay Set: 24 Colors | 50 Colors", "Bead Kit: 5000 Pieces | Alphabet Beads",
            "Pottery Wheel for Kids: with Clay and Paints | Battery Powered",
            "Origami Paper Kit: 200 Sheets | with Guide Book",
        ], ["for Creative Kids", "Arts and Crafts", "Rainy Day Project"]),
        "tools": ([
            "Full Size Hot Glue Gun: 100W | 60W, with 30 Sticks",
            "Rotary Tool Kit: Variable Speed, 120 Accessories | Cordless",
            "Wood Burning Pen Kit: 37-Piece | with Temperature Control", "Scroll Saw: 16-inch | 18-inch",
            "Precision Hobby Knife Set: 13-Piece | with Safety Cap", "Mini Bench Vise: 3-inch | Swivel Base",
        ], ["for Woodworking and Crafts", "for Hobbyists", "for DIY Projects"]),
        "electronics": ([
            "Electronic Cutting Machine: 12-inch, Bluetooth | for Vinyl and Cardstock",
            "Heat Press Machine: 15 x 15 inch | Swing Away", "FDM 3D Printer: 220 x 220 x 250mm | Auto Leveling",
            "LED Light Pad: A4, Dimmable | A3", "3D Printing Pen: with PLA Filament | Temperature Display",
            "Bluetooth Label Maker: with 3 Tapes | Portable",
        ], ["for Makers and Crafters", "for Custom Projects", "Craft Room Essential"]),
        "sports": ([
            "Rotary Fly Tying Vise: with Pedestal Base | Stainless",
            "Fly Tying Materials Kit: Feathers and Hooks | 150-Piece", "Paracord 550 Cord: 100 ft, 7-Strand | 50 ft",
            "Soft Plastic Lure Molds: Worm and Grub, 4-Pack | Swimbait",
            "Arrow Fletching Jig: Straight Clamp | Helical",
            "Fishing Rod Building Kit: 7 ft | with Guides and Reel Seat",
        ], ["for Anglers Who Make Their Own", "Handmade Outdoor Gear", "for Tying Flies"]),
    },
    "pets": {
        "toys": ([
            "Interactive Plush Puppy: Walks and Barks | with Leash", "Toy Vet Kit: 15-Piece | with Carry Case",
            "Pet Grooming Salon Playset: with 2 Pets | 22-Piece",
            "Remote Control Robot Dog: Programmable | Touch Sensing",
            "Animal Hospital Playset: with 6 Animals | Wooden", "Stuffed Kitten Family: with Basket | 4 Kittens",
        ], ["for Kids Who Love Animals", "Pretend Pet Care", "for Future Vets"]),
        "tools": ([
            "Dog Door: Medium, Aluminum Frame | Large, for Walls", "Spiral Tie-Out Stake: 18-inch | with 20 ft Cable",
            "Pet-Proof Screen Mesh: 36-inch x 100 ft | 48-inch x 25 ft",
            "Walk-Through Pet Gate: Extra Wide, 29-38 inch | Pressure Mounted",
            "Rubber Pet Hair Broom: with Squeegee | Telescoping 60-inch",
            "Cat Window Perch Mounting Kit: Suction Cups | Steel Frame",
        ], ["for Dog and Cat Owners", "Pet Friendly Home", "for Multi-Pet Households"]),
        "electronics": ([
            "Automatic Pet Feeder: 6L, with App | 4L, Dual Bowl",
            "Pet Camera: 1080P, Treat Tossing | 2K, Night Vision",
            "GPS Pet Tracker: Waterproof | with Activity Monitor",
            "Pet Water Fountain: 2.5L, Ultra Quiet | 3L, with Filters",
            "Dog Nail Grinder: Rechargeable, 2-Speed | with LED Light", "Smart Pet Door: Microchip | Wi-Fi",
        ], ["for Dogs and Cats", "Pet Tech", "for Busy Pet Parents"]),
        "sports": ([
            "Hands-Free Dog Leash: for Running, 4-6 ft | Reflective",
            "Dog Life Jacket: Ripstop, Adjustable | High Visibility",
            "Collapsible Dog Bowl: Silicone, 2-Pack | 1000ml", "Dog Hiking Backpack: Saddle Bag | Medium",
            "Bike Dog Leash Attachment: Spring Loaded | Quick Release", "Flying Dog Disc: 9-inch | Floating, 2-Pack",
        ], ["for Active Dogs", "for Trail Runs with Your Dog", "for Outdoor Dogs"]),
    },
    "travel": {
        "toys": ([
            "Magnetic Drawing Board: Travel Size | with Stamps", "Magnetic Travel Games: Chess and Checkers | 5-in-1",
            "Ride-On Kids Suitcase: 18-inch | with Wheels", "World Map Puzzle: 100 Pieces | Floor, 48 Pieces",
            "Road Trip Bingo Cards: Set of 12 | Set of 8", "Car Seat Travel Tray: with Tablet Holder | Waterproof",
        ], ["for Road Trips", "for Airplane Rides", "Keeps Kids Busy on the Go"]),
        "tools": ([
            "TSA-Approved Luggage Locks: 4-Digit, 2-Pack | Cable, 4-Pack",
            "Portable Door Lock: for Hotel Security | Travel Door Jammer",
            "Compact Travel Tool Kit: 39-Piece | with Zipper Case", "Keychain Multi-Tool: TSA Friendly | Titanium",
            "12V Portable Tire Inflator: 150 PSI | with LED Light", "Car Jump Starter: 2000A Peak | 1500A, 12V",
        ], ["for Travelers", "for Road Trips and Hotels", "Carry-On Friendly"]),
        "electronics": ([
            "Universal Travel Adapter: All-in-One, 4 USB | with USB-C PD",
            "Noise Cancelling Headphones: Over-Ear, 40H Battery | with Carry Case",
            "Slim Portable Charger: 10000mAh | 5000mAh, USB-C", "Bluetooth Luggage Tracker: 4-Pack | 2-Pack",
            "Foldable Travel Hair Dryer: Dual Voltage | 1200W", "Pocket Travel Router: Wi-Fi 6 | AC750",
        ], ["for International Travel", "for Flights and Hotels", "Travel Essential"]),
        "sports": ([
            "Packable Daypack: 20L, Ultralight | 25L, Water Resistant",
            "Quick-Dry Travel Towel: Microfiber, Large | 2-Pack", "Collapsible Water Bottle: Silicone, 20 oz | 750ml",
            "RFID Money Belt: Hidden | Slim", "Rolling Duffel Bag: 90L | 110L",
            "Waterproof Phone Pouch: Universal, 2-Pack | with Lanyard",
        ], ["for Adventure Travel", "for Trips and Excursions", "for Globetrotters"]),
    },
}
INTERESTS = tuple(VOCABULARY)

# Brands and descriptors belong to a domain, not an interest: they say nothing about what a shopper cares for.
BRANDS = {
    "toys": ("Brightkid", "Playwise", "Tiny Tinkers", "WonderWorks", "Giggle Grove", "Little Explorer", "Kidzone",
             "Hapi Hands", "Sprout & Spark", "Zippy Pals", "Toyvana", "Bumble Box"),
    "tools": ("IronPeak", "Craftline", "Stanwick", "ProGrip", "Boltmaster", "Forgewell", "HardyTec", "Ridgeline",
              "TorqueWorks", "Workhorse", "Steelcore", "Edgecraft"),
    "electronics": ("Voltaic", "Lumina", "Sonix", "Nexora", "Auralis", "PixelPeak", "Zentrix", "Kinetix",
                    "Brightwave", "Ovio", "Hexatron", "Calyx"),
    "sports": ("Summit Gear", "Stridewell", "Apex Athletics", "Peakform", "Tidewater", "Northbound", "Velocity Pro",
               "Trailhead", "Everfit", "Boulder & Pine", "Aerocore", "Kinetic Edge"),
}
DESCRIPTORS = {
    "toys": ("Deluxe", "Classic", "Educational", "Premium", "Award-Winning", "Original"),
    "tools": ("Heavy-Duty", "Professional", "Premium", "Compact", "Upgraded", "Contractor-Grade"),
    "electronics": ("Upgraded", "Premium", "2024 Model", "Advanced", "Pro", "Compact"),
    "sports": ("Premium", "Durable", "Lightweight", "Pro Series", "All-Season", "Heavy-Duty"),
}
# Each domain's listing styles, as Amazon sellers in that category tend to write them.
TEMPLATES = {
    "toys": ("{brand} {noun} {spec} {phrase}",
             "{brand} {descriptor} {noun} ({spec}), {phrase}, Ages {age}+",
             "{brand} {noun}, {spec} - {descriptor} Gift {phrase}"),
    "tools": ("{brand} {descriptor} {noun}, {spec}",
              "{brand} {noun} {spec} - {descriptor}, {phrase}",
              "{brand} {noun}, {spec}, {phrase}"),
    "electronics": ("{brand} {noun}, {spec}, {phrase}",
                    "{brand} {descriptor} {noun} ({spec})",
                    "{brand} {noun} {spec} - {descriptor} Edition {phrase}"),
    "sports": ("{brand} {descriptor} {noun} - {spec}",
               "{brand} {noun}, {spec}, {phrase}",
               "{brand} {descriptor} {noun} {phrase}, {spec}"),
}
_ID_CHARS = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
_EPOCH = 1451606400  # 2016-01-01, where the world's clock starts


def products(interest: str, domain: str) -> list[tuple[str, list[str]]]:
    """(noun, specs) of each product an interest has in a domain."""
    parsed = []
    for entry in VOCABULARY[interest][domain][0]:
        noun, specs = entry.split(": ")
        parsed.append((noun, specs.split(" | ")))
    return parsed


@dataclass(frozen=True)
class WorldConfig:
    """The demo world's size and behaviour; written to raw/world.json next to the raw files."""

    users_per_domain: int = 1500  # about this many users are active in each domain
    items_per_interest: int = 30  # items of each interest in each domain (10 interests: 300 items a domain)
    domains: tuple[str, ...] = DOMAINS
    interests: tuple[str, ...] = INTERESTS
    min_length: int = 6  # items a user buys in a domain they are active in, before 5-core
    max_length: int = 20
    noise: float = 0.15  # chance that a purchase ignores the user's interests
    stickiness: float = 0.7  # chance that a purchase stays with the previous purchase's interest
    zipf: float = 1.0  # exponent of popularity within an interest's items
    interest_zipf: float = 0.8  # exponent of how many users hold each interest
    seed: int = 0

    def __post_init__(self):
        unknown = [d for d in self.domains if d not in DOMAINS] + [i for i in self.interests if i not in VOCABULARY]
        if unknown:
            raise DataError(f"unknown domains or interests {unknown}; choose from {DOMAINS} and {INTERESTS}")
        if not self.domains or not self.interests:
            raise DataError("the world needs at least one domain and one interest")
        if not 1 <= self.min_length <= self.max_length:
            raise DataError(f"need 1 <= --min-length <= --max-length (got {self.min_length}, {self.max_length})")
        if self.users_per_domain < 1 or self.items_per_interest < 1 or self.seed < 0:
            raise DataError("--users-per-domain and --items-per-interest must be positive, --seed non-negative")
        if not (0 <= self.noise <= 1 and 0 <= self.stickiness <= 1):
            raise DataError("--noise and --stickiness are probabilities in [0, 1]")


@dataclass
class Item:
    item_id: str
    title: str
    interest: str
    weight: float  # popularity within its interest and domain


@dataclass
class User:
    user_id: str
    interests: list[str]
    weights: np.ndarray  # how much of their shopping each interest takes
    domains: list[str]


def random_ids(rng: np.random.Generator, count: int, prefix: str, length: int, taken: set[str]) -> list[str]:
    """Amazon-looking ids (ASINs start with B0, reviewer ids with A), unique among `taken`."""
    ids = []
    while len(ids) < count:
        candidate = prefix + "".join(_ID_CHARS[rng.integers(len(_ID_CHARS), size=length)])
        if candidate not in taken:
            taken.add(candidate)
            ids.append(candidate)
    return ids


def make_catalog(rng: np.random.Generator, domain: str, world: WorldConfig, taken: set[str]) -> list[Item]:
    """Items of every interest in one domain, each title unique, with Zipf popularity inside its interest."""
    items, titles = [], set()
    brands, descriptors, templates = BRANDS[domain], DESCRIPTORS[domain], TEMPLATES[domain]
    for interest in world.interests:
        shelf, phrases = products(interest, domain), VOCABULARY[interest][domain][1]
        # Popularity ranks are shuffled so neither the noun order nor the id order says which item sells most.
        ranks = rng.permutation(world.items_per_interest) + 1
        for j in range(world.items_per_interest):
            noun, specs = shelf[j % len(shelf)]
            for _ in range(100):
                title = templates[int(rng.integers(len(templates)))].format(
                    brand=brands[int(rng.integers(len(brands)))],
                    descriptor=descriptors[int(rng.integers(len(descriptors)))],
                    noun=noun,
                    spec=specs[int(rng.integers(len(specs)))],
                    phrase=phrases[int(rng.integers(len(phrases)))],
                    age=(3, 4, 5, 6, 8)[int(rng.integers(5))],
                )
                if title not in titles:
                    break
            else:  # a catalogue larger than the vocabulary's combinations: number the variants
                title = f"{title} (Model {j + 1})"
            titles.add(title)
            items.append(Item("", title, interest, 1.0 / ranks[j] ** world.zipf))
    for item, item_id in zip(items, random_ids(rng, len(items), "B0", 8, taken)):
        item.item_id = item_id
    return items


def make_users(rng: np.random.Generator, world: WorldConfig) -> list[User]:
    """Users with one to three interests, each active in several domains with those same interests."""
    n_domains = len(world.domains)
    fewest = min(2, n_domains)
    mean_active = (fewest + n_domains) / 2
    count = math.ceil(world.users_per_domain * n_domains / mean_active)
    # Some hobbies are commoner than others: interests draw shoppers with Zipf weights in a seeded order.
    appeal = 1.0 / (rng.permutation(len(world.interests)) + 1.0) ** world.interest_zipf
    users = []
    for user_id in random_ids(rng, count, "A", 13, set()):
        k = min(len(world.interests), 1 + int(np.searchsorted([0.35, 0.75], rng.random())))  # 1, 2, 3: 35/40/25%
        picks, left = [], appeal.copy()
        for _ in range(k):
            picks.append(draw(rng, left))
            left[picks[-1]] = 0.0
        active = rng.permutation(n_domains)[: int(rng.integers(fewest, n_domains + 1))]
        users.append(User(
            user_id=user_id,
            interests=[world.interests[i] for i in picks],
            weights=rng.dirichlet(np.full(k, 2.0)),
            domains=[world.domains[d] for d in sorted(active.tolist())],
        ))
    return users


def draw(rng: np.random.Generator, weights: np.ndarray) -> int:
    """An index drawn with probability proportional to `weights` (non-negative, positive sum)."""
    cumulative = np.cumsum(weights)
    return min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(weights) - 1)


def shop(rng: np.random.Generator, user: User, catalog: list[Item], world: WorldConfig) -> list[Item]:
    """One user's purchases in one domain, oldest first: interest by interest with stickiness, Zipf popularity
    within an interest, and some noise; an item is bought at most once."""
    length = int(rng.integers(world.min_length, world.max_length + 1))
    length = min(length, len(catalog))
    by_interest = {i: np.array([k for k, item in enumerate(catalog) if item.interest == i]) for i in user.interests}
    popularity = np.array([item.weight for item in catalog])
    bought = np.zeros(len(catalog), dtype=bool)
    current = user.interests[draw(rng, user.weights)]
    purchases = []
    for step in range(length):
        if step > 0 and rng.random() > world.stickiness:
            current = user.interests[draw(rng, user.weights)]
        pool = by_interest[current]
        weights = popularity[pool] * ~bought[pool]
        if rng.random() < world.noise or weights.sum() == 0:  # off-interest: the domain's bestsellers, like anyone
            pool = np.arange(len(catalog))
            weights = popularity * ~bought
        choice = int(pool[draw(rng, weights)])
        bought[choice] = True
        purchases.append(catalog[choice])
    return purchases


def write_csv(path: Path, header: tuple[str, ...], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_raw_world(root: Path, world: WorldConfig) -> None:
    """Write `root/raw/`: per domain interactions.csv, items.csv and item_interests.csv; users.csv; world.json."""
    rng = np.random.default_rng(world.seed)
    taken: set[str] = set()
    catalogs = {domain: make_catalog(rng, domain, world, taken) for domain in world.domains}
    users = make_users(rng, world)
    interactions = {domain: [] for domain in world.domains}
    for user in tqdm(users, desc="synthetic users", unit="user", disable=None, leave=False):
        baskets = {domain: shop(rng, user, catalogs[domain], world) for domain in user.domains}
        # One clock per user, purchases about nine days apart, the domains interleaved at random.
        slots = np.concatenate([np.full(len(basket), d) for d, basket in enumerate(baskets.values())])
        slots = slots[rng.permutation(len(slots))]
        times = _EPOCH + rng.uniform(0, 3 * 365 * 86400) + np.cumsum(rng.exponential(9 * 86400, size=len(slots)))
        for d, (domain, basket) in enumerate(baskets.items()):
            for item, time in zip(basket, times[slots == d].tolist()):
                interactions[domain].append((user.user_id, item.item_id, int(time)))

    raw = root / "raw"
    for domain in world.domains:
        # Logs arrive in time order, not grouped by user, as real exports do.
        rows = sorted(interactions[domain], key=lambda row: row[2])
        write_csv(raw / domain / "interactions.csv", ("user_id", "item_id", "timestamp"), rows)
        catalog = sorted(catalogs[domain], key=lambda item: item.item_id)  # no grouping by interest in the raw files
        write_csv(raw / domain / "items.csv", ("item_id", "title"), ((i.item_id, i.title) for i in catalog))
        write_csv(raw / domain / "item_interests.csv", ("item_id", "interest"),
                  ((i.item_id, i.interest) for i in catalog))
    write_csv(raw / "users.csv", ("user_id", "interests", "domains"),
              ((u.user_id, ";".join(u.interests), ";".join(u.domains)) for u in users))
    with open(raw / "world.json", "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(asdict(world), sort_keys=True, indent=2) + "\n")


def generate_world(
    out_dir: str | Path = "data/demo", world: WorldConfig = WorldConfig(), prep: PrepConfig | None = None
) -> dict[str, dict]:
    """Generate the demo world into `out_dir` (raw files under raw/, one processed folder per domain) and return
    each domain's meta dict. `prep` defaults to the pipeline's defaults with the world's seed.

    >>> metas = generate_world("data/demo")  # doctest: +SKIP
    >>> metas["tools"]["counts"]["users"]  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    prep = prep or PrepConfig(seed=world.seed)
    # Built whole beside the destination, then moved in entry by entry, so a crash never leaves half a world that a
    # later run would take for a finished one.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write_raw_world(tmp, world)
        metas = {}
        for domain in world.domains:
            raw = tmp / "raw" / domain
            metas[domain] = import_csv(raw / "interactions.csv", raw / "items.csv", domain=domain, out_dir=tmp,
                                       config=prep)
        out_dir.mkdir(exist_ok=True)
        for entry in ["raw", *world.domains]:
            replace_path(tmp / entry, out_dir / entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metas


def main(argv: list[str] | None = None) -> int:
    defaults = WorldConfig()
    parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="world directory (default data/demo)")
    parser.add_argument("--users-per-domain", type=int, default=defaults.users_per_domain)
    parser.add_argument("--items-per-interest", type=int, default=defaults.items_per_interest,
                        help="items of each interest in each domain")
    parser.add_argument("--domains", default=",".join(defaults.domains),
                        help="comma-separated, from " + ",".join(DOMAINS))
    parser.add_argument("--interests", default=",".join(defaults.interests), help="comma-separated")
    parser.add_argument("--min-length", type=int, default=defaults.min_length, help="purchases per active domain")
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--noise", type=float, default=defaults.noise)
    parser.add_argument("--stickiness", type=float, default=defaults.stickiness)
    parser.add_argument("--zipf", type=float, default=defaults.zipf, help="popularity skew within an interest")
    parser.add_argument("--interest-zipf", type=float, default=defaults.interest_zipf,
                        help="skew of how many users hold each interest")
    add_pipeline_arguments(parser)  # its --seed seeds the world and the candidates alike
    args = parser.parse_args(argv)

    def job():
        world = WorldConfig(
            users_per_domain=args.users_per_domain, items_per_interest=args.items_per_interest,
            domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()),
            interests=tuple(i.strip() for i in args.interests.split(",") if i.strip()),
            min_length=args.min_length, max_length=args.max_length, noise=args.noise, stickiness=args.stickiness,
            zipf=args.zipf, interest_zipf=args.interest_zipf, seed=args.seed,
        )
        metas = generate_world(args.out, world, config_from_args(args))
        return [(meta, args.out) for meta in metas.values()]

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
