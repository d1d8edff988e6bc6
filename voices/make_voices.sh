#!/usr/bin/env bash
# Regenerate the bundled sample speakers with espeak-ng and sox (Debian packages espeak-ng, sox).
set -euo pipefail
cd "$(dirname "$0")"

trim() { sox "$1" -c 1 "$2" silence 1 0.05 0.1% reverse silence 1 0.05 0.1% reverse pad 0.1 0.1; }

make_speaker() {  # name espeak-voice language reference-sentence sentences...
  local name=$1 voice=$2 language=$3 reference=$4; shift 4
  rm -rf "$name"; mkdir -p "$name/clips"; : > "$name/metadata.jsonl"
  local raw; raw=$(mktemp --suffix=.wav)
  espeak-ng -v "$voice" -s 155 -w "$raw" "$reference"
  trim "$raw" "$raw.trim.wav"; sox "$raw.trim.wav" -b 16 "$name.wav" rate -v 24000
  local i=0
  for sentence in "$@"; do
    i=$((i + 1)); local clip; clip=$(printf "clips/%s_%03d.flac" "$name" "$i")
    espeak-ng -v "$voice" -s 155 -w "$raw" "$sentence"
    trim "$raw" "$name/$clip"
    printf '{"audio": "%s", "text": "%s", "language": "%s"}\n' "$clip" "$sentence" "$language" >> "$name/metadata.jsonl"
  done
  rm -f "$raw" "$raw.trim.wav"
}

make_speaker english_speaker en-us+m3 english \
  "Hello, I am the English sample speaker, and this is how my voice sounds." \
  "Good morning." \
  "The weather is lovely today." \
  "Please close the door behind you." \
  "I would like a cup of tea." \
  "The train leaves at seven." \
  "She reads a book every night." \
  "Can you help me find the station?" \
  "We planted tomatoes in the garden." \
  "The children are playing outside." \
  "Thank you very much for your help." \
  "My brother works at the hospital." \
  "It is getting late, let us go home." \
  "The market opens early on Saturday." \
  "Turn left at the next corner."

make_speaker swahili_speaker sw+f3 auto \
  "Habari, mimi ni msemaji wa mfano wa Kiswahili, na hii ni sauti yangu." \
  "Habari za asubuhi." \
  "Leo hali ya hewa ni nzuri." \
  "Tafadhali funga mlango." \
  "Ninapenda kunywa chai." \
  "Treni inaondoka saa moja." \
  "Yeye husoma kitabu kila usiku." \
  "Unaweza kunisaidia kupata kituo?" \
  "Tulipanda nyanya bustanini." \
  "Watoto wanacheza nje." \
  "Asante sana kwa msaada wako." \
  "Kaka yangu anafanya kazi hospitalini." \
  "Ni usiku sasa, twende nyumbani." \
  "Soko linafunguliwa mapema Jumamosi." \
  "Geuka kushoto kwenye kona ijayo."
