#!/usr/bin/env bash
# Regenerate the bundled synthetic sample speakers in voices/.
#
# Requires: espeak-ng (tested with 1.51) and sox (tested with 14.4.2, built
# with FLAC support). Run from anywhere:  bash voices/make_voices.sh
#
# Output layout (relative to this script's folder):
#   <speaker>.wav                      reference clip, 3-5 s, mono s16 PCM, 24000 Hz
#   <speaker>/clips/<speaker>_NNN.flac corpus clips, 1-4 s, mono 16-bit, 22050 Hz
#   <speaker>/metadata.jsonl           {"audio": "clips/...", "text": ..., "language": ...}
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

SPEED=155            # words per minute (espeak-ng -s)
MIN_DUR=1.0          # corpus clip duration bounds, seconds
MAX_DUR=4.0
REF_MIN_DUR=3.0      # reference clip duration bounds, seconds
REF_MAX_DUR=5.0

# Trim leading/trailing silence, then pad 0.1 s on both sides.
TRIM=(silence 1 0.05 0.1% reverse silence 1 0.05 0.1% reverse pad 0.1 0.1)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# ---------------------------------------------------------------- sentences --

ENGLISH_REF="Hello, my name is Daniel. It is nice to meet you."
ENGLISH_SENTENCES=(
  "Good morning, how are you?"
  "The coffee is too hot."
  "Please close the door."
  "I will call you later."
  "The train leaves at seven."
  "She bought fresh bread."
  "It might rain tonight."
  "Can you help me, please?"
  "We walked along the river."
  "My brother plays the guitar."
  "The meeting is on Friday."
  "Thank you for your help."
  "The children are outside."
  "Turn left at the light."
)

SWAHILI_REF="Habari, jina langu ni Amina, karibu sana."
SWAHILI_SENTENCES=(
  "Habari za asubuhi."
  "Leo kuna jua kali."
  "Ninapenda chai."
  "Watoto wanacheza."
  "Tafadhali funga mlango."
  "Soko liko karibu."
  "Mama anapika wali."
  "Nitakupigia jioni."
  "Basi limefika."
  "Asante sana, rafiki."
  "Mvua inanyesha."
  "Ninajifunza Kiswahili."
  "Kaka yangu yuko mjini."
  "Karibu, keti hapa."
)

# ---------------------------------------------------------------- helpers --

# json_escape STRING -> JSON string literal (with quotes) on stdout.
json_escape() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

# check_duration FILE MIN MAX
check_duration() {
  local f=$1 lo=$2 hi=$3 d
  d="$(soxi -D "$f")"
  if ! awk -v d="$d" -v lo="$lo" -v hi="$hi" 'BEGIN { exit !(d >= lo && d <= hi) }'; then
    echo "ERROR: $f is ${d}s, outside [$lo, $hi] s" >&2
    exit 1
  fi
  printf '  %-45s %6.3f s\n' "$f" "$d"
}

# make_speaker NAME ESPEAK_VOICE LANGUAGE REF_TEXT SENTENCE...
make_speaker() {
  local name=$1 voice=$2 language=$3 ref_text=$4
  shift 4
  local sentences=("$@")

  echo "== $name (espeak-ng -v $voice -s $SPEED) =="
  rm -rf "$name" "$name.wav"
  mkdir -p "$name/clips"

  # Reference clip: 24000 Hz, mono, 16-bit PCM WAV.
  espeak-ng -v "$voice" -s "$SPEED" -w "$TMP/raw.wav" "$ref_text"
  sox -R "$TMP/raw.wav" -c 1 -b 16 -e signed-integer "$name.wav" "${TRIM[@]}" rate -v 24000
  check_duration "$name.wav" "$REF_MIN_DUR" "$REF_MAX_DUR"

  # Corpus: native espeak-ng rate (22050 Hz), mono, 16-bit FLAC.
  local meta="$name/metadata.jsonl" i=0 text file
  : > "$meta"
  for text in "${sentences[@]}"; do
    i=$((i + 1))
    file="$(printf '%s_%03d.flac' "$name" "$i")"
    espeak-ng -v "$voice" -s "$SPEED" -w "$TMP/raw.wav" "$text"
    sox -R "$TMP/raw.wav" -c 1 -b 16 "$name/clips/$file" "${TRIM[@]}"
    check_duration "$name/clips/$file" "$MIN_DUR" "$MAX_DUR"
    printf '{"audio": %s, "text": %s, "language": %s}\n' \
      "$(json_escape "clips/$file")" "$(json_escape "$text")" "$(json_escape "$language")" >> "$meta"
  done
}

# ------------------------------------------------------------------- main --

make_speaker english_speaker "en-us+m3" english "$ENGLISH_REF" "${ENGLISH_SENTENCES[@]}"
make_speaker swahili_speaker "sw+f3" swahili "$SWAHILI_REF" "${SWAHILI_SENTENCES[@]}"

echo "== total size =="
du -sh "$HERE"
